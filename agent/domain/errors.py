"""ShopLens's exceptions: one module, two families.

* `CallerError`: the request is wrong (bad input, unknown user or dataset). Retrying the same
  request cannot help; the caller must change it. Each carries `param` (the field at fault, as
  a path such as ``events[3].timestamp``), a stable `code`, and the HTTP status an API answers
  with. They subclass `ValueError` (or `LookupError`) so plain Python callers can catch them the
  usual way.
* `RuntimeFailure`: ShopLens or a dependency failed (the model is down or answered invalid
  output, the packaged model is corrupt, an index was built for another embedder). Each carries
  what a caller needs to act: attempts, the last raw output, when to retry.

The HTTP layer maps both families onto one error envelope in one place (`ui/api/errors.py`);
nothing else decides status codes. Pattern: pydantic-ai ``exceptions.py``, instructor
``exceptions.py``.
"""

from __future__ import annotations


class ShopLensError(Exception):
    """Base of every ShopLens exception."""


# ---- caller mistakes ---------------------------------------------------------------------------


class CallerError(ShopLensError, ValueError):
    """A caller mistake: the message names the field and the fix.

    Attributes:
        param: the field at fault as a path (``dataset``, ``events[3].timestamp``), or None.
        code: a stable machine-readable reason (``unknown_dataset``, ``invalid_value``, ...).
        status: the HTTP status the API answers with (422 unless a subclass says otherwise).
    """

    status: int = 422
    default_code: str = "invalid_value"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code


class RequestError(CallerError):
    """A request field has an invalid value (the generic caller mistake)."""


class UnknownDatasetError(CallerError):
    """The dataset was never ingested (or was never created by an operator)."""

    default_code = "unknown_dataset"

    def __init__(self, dataset: str, known: list[str], hint: str = ""):
        """`hint`, when given, follows the list: how to get the dataset (e.g. how to create it)."""
        super().__init__(f"unknown dataset {dataset!r}; ingested: {known}{f'; {hint}' if hint else ''}",
                         param="dataset")
        self.dataset = dataset
        self.known = known


class UnknownUserError(CallerError, LookupError):
    """The store has no events for this user in this dataset.

    `suggestions` are close stored ids; surfaces that serve other clients' users must not show
    them (the API does not: they would let one client enumerate another's ids).
    """

    status = 404
    default_code = "unknown_user"

    def __init__(self, dataset: str, user_id: str, suggestions: list[str] | None = None):
        self.dataset, self.user_id, self.suggestions = dataset, user_id, suggestions or []
        hint = f"; did you mean {', '.join(self.suggestions)}?" if self.suggestions else ""
        super().__init__(f"no user {user_id!r} in dataset {dataset!r}{hint}", param="user_id")


class UnknownRecommendationError(CallerError, LookupError):
    """A recommendation id this server never gave out, or has forgotten."""

    status = 404
    default_code = "unknown_recommendation"

    def __init__(self, rec_id: str, ttl_s: float | None = None, message: str | None = None):
        self.rec_id = rec_id
        super().__init__(message or f"recommendation_id {rec_id!r} not found: it was never returned by "
                         f"POST /v1/next-item on this server, or is older than {ttl_s or 0:g} s (ask again)",
                         param="recommendation_id")


# ---- runtime failures --------------------------------------------------------------------------


class RuntimeFailure(ShopLensError):
    """ShopLens or a dependency failed; the request itself may be fine."""


class ModelUnavailableError(RuntimeFailure):
    """The model server could not answer (down, loading, timed out, 5xx).

    Attributes:
        attempts: calls made before giving up.
        retry_after_s: when a retry may succeed (seconds), if known.
    """

    def __init__(self, message: str, *, attempts: int = 1, retry_after_s: float | None = None):
        super().__init__(message)
        self.attempts = attempts
        self.retry_after_s = retry_after_s


class ModelRequestError(RuntimeFailure):
    """The model server rejected a request ShopLens built (a 4xx other than 429): a mismatch
    between ShopLens and the server's configuration, e.g. more `top_logprobs` than vLLM's
    ``--max-logprobs``, or a schema outside the structured-output backend's subset. Retrying
    the same request cannot help, so it is not a `ModelUnavailableError`.

    Attributes:
        status_code: the HTTP status (400, 404, 422, ...).
        param: the request field the server blamed, when it said.
        server_message: the server's own error message.
    """

    def __init__(self, message: str, *, status_code: int, param: str | None = None,
                 server_message: str = ""):
        super().__init__(message)
        self.status_code = status_code
        self.param = param
        self.server_message = server_message


class OutputValidationError(RuntimeFailure):
    """The model's answer failed schema validation after every allowed attempt.

    Attributes:
        attempts: model calls made (the first call plus repairs).
        last_output: the last raw text the model returned.
        errors: the validation errors of the last attempt, as ``field.path: message`` lines.
    """

    def __init__(self, message: str, *, attempts: int, last_output: str, errors: list[str]):
        super().__init__(message)
        self.attempts = attempts
        self.last_output = last_output
        self.errors = errors


class ModelIntegrityError(RuntimeFailure):
    """The assembled GGUF does not hash to the official release's sha256 (refused)."""


class ArtifactMismatchError(RuntimeFailure):
    """A saved artifact (index, trained model) was built for another embedder, dimension,
    dataset or configuration than the one asked for; the message names both sides."""
