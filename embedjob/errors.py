"""The user-facing errors: each is printed as one clear line by the CLI (no traceback soup).

* :class:`~embedjob.config.ConfigError` — the job spec (key named), before any work;
* :class:`~embedjob.read.InputError` — shards and columns (file and column named), before any work
  where it can be known then;
* :class:`~embedjob.storage.StorageError` — a URL that cannot be read or written;
* :class:`~embedjob.models.ModelError` — the model setting;
* :class:`~embedjob.lease.LeaseError` — another run holds the output (holder named), before any
  work, or took it over mid-run (before the manifest is written);
* :class:`~embedjob.pipeline.JobError` — a stage that failed (what was committed is kept).
"""

from embedjob.config import ConfigError
from embedjob.lease import LeaseError
from embedjob.models import ModelError
from embedjob.pipeline import JobError
from embedjob.read import InputError
from embedjob.storage import StorageError

USER_ERRORS = (ConfigError, InputError, StorageError, ModelError, JobError, LeaseError)
