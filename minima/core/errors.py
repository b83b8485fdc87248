"""One exception class per failure kind. Each carries what went wrong, where, and how to fix it."""

from __future__ import annotations


class MinimaError(Exception):
    """Base class for user-facing errors: the CLI prints them as one line plus a hint, exit 2.

    Args:
        what: what went wrong, in one sentence.
        where: the file, line, record or config field involved (optional).
        fix: what the user should do about it (optional).
    """

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(self.format())

    def format(self) -> str:
        msg = f"{self.where}: {self.what}" if self.where else self.what
        if self.fix:
            msg += f" (fix: {self.fix})"
        return msg


class ConfigError(MinimaError):
    """A config field, override or preset is invalid."""


class InputError(MinimaError):
    """An input file or directory is missing, unreadable or of the wrong kind."""


class DataError(MinimaError):
    """A record in an input file is malformed (names file:line)."""


class ArtifactError(MinimaError):
    """An output directory clashes with an existing artifact, or an artifact is incomplete."""


class TrainingError(MinimaError):
    """Training diverged (NaN/inf), a rank failed to join, or a launch failed."""


class PlanError(MinimaError):
    """A plan says the job will not fit."""


class LockError(ArtifactError):
    """Another run holds the lock of the same output directory."""


class DiskFullError(ArtifactError):
    """The disk filled up while a stage was writing (ENOSPC), or will not hold the stage's output."""


class SandboxError(MinimaError):
    """Generated code cannot be run in an isolated sandbox here, and unsafe execution was not allowed."""


class TokenizerMismatchError(InputError):
    """Two artifacts that must share a tokenizer (token ids) were built with different ones."""
