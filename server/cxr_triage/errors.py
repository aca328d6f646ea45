"""One error hierarchy for the whole service.

Every error carries a stable machine-readable ``code`` (part of the HTTP contract, see API.md),
the HTTP status it maps to, and a message that tells the caller what to do about it. Code
below the HTTP edge raises these; ``serving.http_errors`` is the one place that turns them
into responses.
"""


class CxrError(Exception):
    """Root of every error the service raises on purpose."""

    code: str = "internal_error"
    status: int = 500

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}

    def __reduce__(self):  # keep code/status when pickled across worker processes
        return (_rebuild, (type(self), self.message, self.code, self.status))


def _rebuild(cls: type[CxrError], message: str, code: str, status: int) -> CxrError:
    return cls(message, code=code, status=status)


# --- request errors (4xx) -------------------------------------------------------------------


class BadRequest(CxrError):
    code, status = "bad_request", 400


class PayloadTooLarge(CxrError):
    code, status = "payload_too_large", 413


class ImageTooLarge(CxrError):
    code, status = "image_too_large", 413


class UnsupportedMediaType(CxrError):
    code, status = "unsupported_media_type", 415


class ModelNotFound(CxrError):
    code, status = "model_not_found", 404


class StudyNotFound(CxrError):
    code, status = "study_not_found", 404


class FindingNotFound(CxrError):
    code, status = "finding_not_found", 404


class FindingExists(CxrError):
    """A finding of that name (or a trained label spelled differently) is scored already."""

    code, status = "finding_exists", 409


class NotZeroShot(CxrError):
    """Findings can be added to zero-shot (type: gzsl) models only."""

    code, status = "not_zero_shot", 400


# --- image content that cannot be scored (422) ----------------------------------------------


class ImageError(CxrError):
    """The bytes arrived but the image in them cannot be scored."""

    code, status = "unscorable_image", 422


class NotAnImage(ImageError):
    code = "not_an_image"


class CorruptImage(ImageError):
    code = "corrupt_image"


class MultiFrame(ImageError):
    code = "multi_frame"


class UnsupportedPhotometric(ImageError):
    code = "unsupported_photometric"


class PixelDataMissing(ImageError):
    code = "pixel_data_missing"


class UnsupportedTransferSyntax(ImageError):
    code = "unsupported_transfer_syntax"


class WrongModality(ImageError):
    code = "wrong_modality"


# --- service state (5xx that are not bugs) --------------------------------------------------


class NotReady(CxrError):
    code, status = "not_ready", 503


class Overloaded(CxrError):
    code, status = "overloaded", 429


class TimedOut(CxrError):
    code, status = "timeout", 504


# --- start-up / operator errors (never reach HTTP) ------------------------------------------


class RepositoryError(CxrError):
    """model_repo/ breaks its contract; the message lists every problem and how to fix it."""

    code, status = "invalid_model_repository", 500


class ExportError(CxrError):
    code, status = "export_failed", 500
