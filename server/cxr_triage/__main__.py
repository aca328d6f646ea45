from cxr_triage.cli import app

app()
