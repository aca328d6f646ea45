"""Lua scripts: every multi-step change to the queue is one atomic script (Redis 6.2 EVALSHA).

Key names are built inside the scripts from the ``cxr:`` prefix, which is right for one Redis
(embedded or standalone); a Redis Cluster would need hash tags.

The scripts announce changes for the processes that act on them at once instead of polling.
``new <priority>`` when a job is queued (``new <priority> lone`` when it is the only job queued
and none is leased; ``new`` alone when jobs go back to the queue), for the inference workers: on
``cxr:events:urgent`` (URGENT_EVENTS) for a stat or urgent job, a lone one and jobs back in the
queue, the urgent lane's work, and on ``cxr:events`` (EVENTS) for the rest, which only the
routine workers follow (so the lane sleeps through a stream of routine jobs). When a job is done
or failed, its id and, for a synchronous job, its status and outcome, for the HTTP processes
whose requests wait for it (``serving.replies``): on the channel each such process named when it
queued the job (its ``reply_to``), else on ``cxr:done`` (DONE). Pub/sub is fire and forget: both
still look at Redis now and then, so a lost announcement only costs time.
"""

EVENTS = b"cxr:events"
URGENT_EVENTS = b"cxr:events:urgent"
DONE = b"cxr:done"

# Lua helpers the scripts below start with. raise_place moves a study's worklist place up
# (never down) and records why; no-op once it was read.
# When every job of a tracked study has finished, the study goes to the SR outbox.
_HELPERS = """
local function raise_place(job_key, job_id, place, reason)
  local study = redis.call('HGET', job_key, 'study_uid')
  if (not study) or study == '' or redis.call('HGET', job_key, 'track') ~= '1' then return end
  local sk = 'cxr:study:' .. study
  if redis.call('HEXISTS', sk, 'reported_at') == 1 then
    -- read already: only an abnormal (or unscored) new image brings the study back
    if tonumber(place) < 1 then return end
    redis.call('HDEL', sk, 'reported_at')
    reason = 'new image after the report: ' .. reason
  end
  local old = redis.call('ZSCORE', 'cxr:worklist', study)
  if (not old) or tonumber(place) > tonumber(old) then
    redis.call('ZADD', 'cxr:worklist', place, study)
    redis.call('HSET', sk, 'place_reason', reason, 'place_job', job_id)
  end
end

-- A job back in the queue at its original deadline (its attempt counter kept).
local function requeue(job_key, job_id)
  redis.call('HSET', job_key, 'status', 'queued')
  redis.call('ZADD', 'cxr:queue', redis.call('HGET', job_key, 'deadline'), job_id)
end

-- A job that is done or failed: whoever waits for it answers now. A synchronous job's
-- announcement carries its outcome ("<id>\\n<status>\\n<outcome json>"), so that the request
-- waiting for it needs no look-up, and goes to the channels of the HTTP processes whose
-- requests wait for it (reply_to), or to cxr:done when it names none; a tracked study's job
-- (no request waits for it) announces its id alone, on cxr:done.
local function announce_done(job_key, job_id, status, outcome)
  if redis.call('HGET', job_key, 'track') == '1' then
    redis.call('PUBLISH', 'cxr:done', job_id)
    return
  end
  local message = job_id .. '\\n' .. status .. '\\n' .. outcome
  local reply_to = redis.call('HGET', job_key, 'reply_to') or ''
  if reply_to == '' then
    redis.call('PUBLISH', 'cxr:done', message)
  end
  for channel in string.gmatch(reply_to, '%S+') do
    redis.call('PUBLISH', channel, message)
  end
end

local function study_finished(job_key)
  local study = redis.call('HGET', job_key, 'study_uid')
  if (not study) or study == '' or redis.call('HGET', job_key, 'track') ~= '1' then return end
  for _, id in ipairs(redis.call('SMEMBERS', 'cxr:study:' .. study .. ':jobs')) do
    local s = redis.call('HGET', 'cxr:job:' .. id, 'status')
    if s ~= 'done' and s ~= 'failed' then return end
  end
  redis.call('RPUSH', 'cxr:outbox:sr', study)
end
"""

# KEYS: none. ARGV: job_id, deadline, now, payload, instance_key ('' = no dedup), study_uid
# ('' = none), track (1 = on the worklist), priority_rank, DICOM header ('' = none), most jobs
# ready ('' = no bound), the reply channel of the HTTP process whose request waits for the job
# ('' = none: cxr:done), then job hash field/value pairs. A duplicate's reply channel is added
# to the first job's, so that its request, too, is answered when that job is done.
# Returns {1, job_id} when queued, {0, existing_job_id} for a duplicate instance, {-1, ''} when
# the queue already holds the most jobs ready (checked and queued in one step: no burst of
# requests gets past the bound together).
SUBMIT = """
local id, deadline, now, payload = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local instance_key, study, track, rank, header = ARGV[5], ARGV[6], ARGV[7], tonumber(ARGV[8]), ARGV[9]
if ARGV[10] ~= '' and redis.call('ZCARD', 'cxr:queue') >= tonumber(ARGV[10]) then return {-1, ''} end
if instance_key ~= '' then
  local existing = redis.call('GET', instance_key)
  -- a failed job does not block a new try of the same instance
  if existing and redis.call('HGET', 'cxr:job:' .. existing, 'status') ~= 'failed' then
    local reply_to = redis.call('HGET', 'cxr:job:' .. existing, 'reply_to') or ''
    if reply_to == '' then reply_to = 'cxr:done' end  -- whoever waits there still hears it
    if ARGV[11] ~= '' and not string.find(' ' .. reply_to .. ' ', ' ' .. ARGV[11] .. ' ', 1, true) then
      redis.call('HSET', 'cxr:job:' .. existing, 'reply_to', reply_to .. ' ' .. ARGV[11])
    end
    return {0, existing}
  end
  redis.call('SET', instance_key, id)
end
local fields = {}
for i = 12, #ARGV do fields[#fields + 1] = ARGV[i] end
local jk = 'cxr:job:' .. id
redis.call('HSET', jk, 'status', 'queued', 'attempts', 0, 'deadline', deadline, 'enqueued_at', now,
           'study_uid', study, 'track', track, 'reply_to', ARGV[11], unpack(fields))
redis.call('SET', 'cxr:payload:' .. id, payload)
if header ~= '' then redis.call('SET', 'cxr:header:' .. id, header) end
redis.call('ZADD', 'cxr:queue', deadline, id)
-- 'lone': the only job queued while none is leased (a quiet moment: the urgent lane's to score)
local priority = redis.call('HGET', jk, 'priority')
local lone = redis.call('ZCARD', 'cxr:queue') == 1 and redis.call('ZCARD', 'cxr:leases') == 0
local channel = (lone or priority == 'stat' or priority == 'urgent') and 'cxr:events:urgent' or 'cxr:events'
redis.call('PUBLISH', channel, 'new ' .. priority .. (lone and ' lone' or ''))
if study ~= '' and track == '1' then
  local sk = 'cxr:study:' .. study
  redis.call('SADD', sk .. ':jobs', id)
  redis.call('HSETNX', sk, 'first_seen', now)
  local best = tonumber(redis.call('HGET', sk, 'priority_rank') or '99')
  if rank < best then
    redis.call('HSET', sk, 'priority_rank', rank, 'priority', redis.call('HGET', jk, 'priority'))
  end
  if redis.call('HEXISTS', sk, 'reported_at') == 0 then
    redis.call('ZADD', 'cxr:worklist', 'NX', 0, study)
    redis.call('HSETNX', sk, 'place_reason', 'queued for scoring')
  end
end
return {1, id}
"""

# ARGV: n, now, lease_s, worker, idle window (s), most backfill jobs per batch. Returns
# {job_id, token, payload, {hash...}} per leased job, earliest deadline first. Workers that
# polled an empty queue within the idle window (cxr:idle, any replica) share what is ready: a
# worker takes at most ceil(ready / (idle + 1)), so that a light load is spread over idle
# workers instead of waiting in one worker's batch. ARGV[7], when not empty, is a deadline
# horizon: only jobs due by then are leased (the urgent lane's worker), whole and unshared.
LEASE = """
local now, window = tonumber(ARGV[2]), tonumber(ARGV[5])
local ids = {}
if ARGV[7] ~= '' then
  ids = redis.call('ZRANGEBYSCORE', 'cxr:queue', '-inf', ARGV[7], 'LIMIT', 0, tonumber(ARGV[1]))
else
  redis.call('ZREM', 'cxr:idle', ARGV[4])
  redis.call('ZREMRANGEBYSCORE', 'cxr:idle', '-inf', now - window)
  local idle = redis.call('ZCARD', 'cxr:idle')
  local n = math.min(tonumber(ARGV[1]), math.ceil(redis.call('ZCARD', 'cxr:queue') / (idle + 1)))
  if n > 0 then ids = redis.call('ZRANGE', 'cxr:queue', 0, n - 1) end
end
-- A batch holds at most ARGV[6] backfill jobs (the rest wait for the next batch): a live job
-- arriving meanwhile then waits for a short batch, not a full one of archive studies. A batch
-- led by a stat or urgent job holds only stat and urgent jobs: it is not made longer by
-- routine images that its study would then wait for.
local max_backfill, backfill, urgent_only = tonumber(ARGV[6]), 0, false
for i, id in ipairs(ids) do
  local priority = redis.call('HGET', 'cxr:job:' .. id, 'priority')
  local urgent = priority == 'stat' or priority == 'urgent'
  if i == 1 then urgent_only = urgent end
  if priority == 'backfill' then backfill = backfill + 1 end
  if (urgent_only and not urgent) or backfill > max_backfill then
    ids = {unpack(ids, 1, i - 1)}
    break
  end
end
local out = {}
-- The order of leases, by Redis and not by the workers' clocks (leased_at): an audit of priority.
local seq = #ids > 0 and redis.call('INCR', 'cxr:lease_seq') or 0
for _, id in ipairs(ids) do
  redis.call('ZREM', 'cxr:queue', id)
  redis.call('ZADD', 'cxr:leases', tonumber(ARGV[2]) + tonumber(ARGV[3]), id)
  local jk = 'cxr:job:' .. id
  local token = redis.call('HINCRBY', jk, 'attempts', 1)
  redis.call('HSET', jk, 'status', 'running', 'worker', ARGV[4], 'leased_at', ARGV[2], 'lease_seq', seq)
  out[#out + 1] = {id, token, redis.call('GET', 'cxr:payload:' .. id), redis.call('HGETALL', jk)}
end
return out
"""

# ARGV: worker, now. The number of jobs ready; a worker that finds none is marked idle (it then
# gets a share of the next ones, see LEASE), one that finds some is not.
POLL = """
local ready = redis.call('ZCARD', 'cxr:queue')
if ready == 0 then
  redis.call('ZADD', 'cxr:idle', ARGV[2], ARGV[1])
else
  redis.call('ZREM', 'cxr:idle', ARGV[1])
end
return ready
"""

# ARGV: for each job of a batch, 7 values: job_id, token, status (done|failed), outcome json,
# now, place, reason. Returns per job 1 when stored, 0 when the lease was stale (the job was
# re-delivered or finished).
COMPLETE = (
    _HELPERS
    + """
local stored = {}
for i = 1, #ARGV, 7 do
  local id, token, status, outcome, now, place, reason = unpack(ARGV, i, i + 6)
  local jk = 'cxr:job:' .. id
  if redis.call('HGET', jk, 'status') ~= 'running' or redis.call('HGET', jk, 'attempts') ~= token then
    stored[#stored + 1] = 0
  else
    redis.call('HSET', jk, 'status', status, 'outcome', outcome, 'finished_at', now)
    redis.call('ZREM', 'cxr:leases', id)
    redis.call('DEL', 'cxr:payload:' .. id)
    if redis.call('HGET', jk, 'track') ~= '1' then
      redis.call('EXPIRE', jk, 3600)  -- a synchronous job is answered; keep it an hour for late pollers
    end
    raise_place(jk, id, place, reason)
    study_finished(jk)
    announce_done(jk, id, status, outcome)
    stored[#stored + 1] = 1
  end
end
return stored
"""
)

# ARGV: now, max_attempts, failed outcome json, unscored place, unscored reason.
# Expired leases go back to the queue at their original deadline; a job that has used up
# max_attempts (it keeps killing workers) fails visibly instead. Returns {requeued, failed}.
REAP = (
    _HELPERS
    + """
local ids = redis.call('ZRANGEBYSCORE', 'cxr:leases', '-inf', ARGV[1])
local requeued, failed = 0, 0
for _, id in ipairs(ids) do
  redis.call('ZREM', 'cxr:leases', id)
  local jk = 'cxr:job:' .. id
  if redis.call('HGET', jk, 'status') == 'running' then
    if tonumber(redis.call('HGET', jk, 'attempts')) >= tonumber(ARGV[2]) then
      redis.call('HSET', jk, 'status', 'failed', 'outcome', ARGV[3], 'finished_at', ARGV[1])
      redis.call('DEL', 'cxr:payload:' .. id)
      raise_place(jk, id, ARGV[4], ARGV[5])
      study_finished(jk)
      announce_done(jk, id, 'failed', ARGV[3])
      failed = failed + 1
    else
      requeue(jk, id)
      requeued = requeued + 1
    end
  end
end
if requeued > 0 then
  redis.call('HINCRBY', 'cxr:stats', 'redelivered', requeued)
  redis.call('PUBLISH', 'cxr:events:urgent', 'new')
end
return {requeued, failed}
"""
)

# ARGV: worker prefix ("replica/"), now. A draining replica's leases go back to the queue at
# their original deadline, for another replica to score now instead of after the lease expires.
# The attempt counter keeps its value, so a late COMPLETE from the releasing worker is stale.
# Returns the number released.
RELEASE = (
    _HELPERS
    + """
local prefix = ARGV[1]
local released = 0
for _, id in ipairs(redis.call('ZRANGE', 'cxr:leases', 0, -1)) do
  local jk = 'cxr:job:' .. id
  local worker = redis.call('HGET', jk, 'worker') or ''
  if string.sub(worker, 1, #prefix) == prefix then
    redis.call('ZREM', 'cxr:leases', id)
    if redis.call('HGET', jk, 'status') == 'running' then
      requeue(jk, id)
      released = released + 1
    end
  end
end
if released > 0 then
  redis.call('HINCRBY', 'cxr:stats', 'released', released)
  redis.call('PUBLISH', 'cxr:events:urgent', 'new')
end
return released
"""
)
