"""The errors a user can act on: each message is one line that names the thing and what to do.
`launch.py` shows an `Error` as one `iterseg: error: ...` line and exits 1; anything else is a bug
and keeps its traceback. Library callers catch `iterseg.errors.Error` (or a subclass) the same way.
"""


class Error(Exception):
  """Something the user can fix: a bad config, missing or damaged files, a busy workdir, ..."""


class SettingsError(Error, ValueError):
  """A config field has a value that cannot work (the message names the field and what is valid)."""


class InputError(Error, ValueError):
  """Images or parameters given to the library do not fit its contract (shape, dtype, range)."""


class DataError(Error, ValueError):
  """A dataset's files are missing, unreadable or inconsistent (the message names the path)."""


class CheckpointError(Error, ValueError):
  """A checkpoint or workdir file is missing, damaged, incomplete, or belongs to another config."""


class TrainingError(Error, RuntimeError):
  """Training cannot go on (a non-finite loss, a checkpoint that cannot be written)."""


class Interrupted(Error, RuntimeError):
  """SIGINT or SIGTERM arrived; what was done is saved and the message says how to go on."""


class PredictError(Error, RuntimeError):
  """Some images could not be segmented (the others were); the summary lists which and why."""


class WriteError(Error, RuntimeError):
  """A folder the run must write to cannot be written to."""


class LockedError(Error, RuntimeError):
  """A workdir, or a dataset being prepared, is in use by another run."""
