"""Typed exceptions raised at the model side's trust boundaries."""


class ModelLoadError(Exception):
    """A model folder is missing, broken or unsupported; the message names the file or tensor."""


class TemplateError(Exception):
    """A chat template failed to render or tried to leave its sandbox."""


class RequestRejected(ValueError):
    """A request is refused before admission (it can never fit, a bad parameter); `param` names
    the request field. Raised by the checks in model.sampling_params and by the engine."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class QueueFull(RuntimeError):
    """Too many requests are already waiting."""


class EngineError(RuntimeError):
    """A step failed for this request; the engine keeps serving the others."""


class PullError(Exception):
    """Preparing a model failed (download, unpacking or conversion); the message is one line."""


class ConversionError(PullError):
    """A GGUF file cannot be converted: unreadable, unsupported architecture or tensor type."""
