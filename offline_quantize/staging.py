"""The output folder of a run, built in a hidden staging folder and renamed into place only when complete."""

import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

from aaac_kernels.format.errors import AAACError

from .progress import PROGRESS_DIR


def staging_path(output: Path) -> Path:
    """Where a run builds ``output``: a hidden sibling, renamed to ``output`` only when complete."""
    return output.parent / f".{output.name}.partial"


@contextmanager
def staging_folder(output: Path, resume: bool = False):
    """Yield the staging folder of ``output``; it replaces ``output`` only if the block finishes.

    Ctrl-C, SIGTERM, a crash or an error leave ``output`` as it was (the old folder, or none), never a
    partial one. A staging folder that holds progress (``.progress/``, see progress.py) is kept for
    ``--resume``, unless the run stopped on bad input (``AAACError``); otherwise it is removed. Without
    ``resume`` an earlier staging folder is discarded.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(output)
    if staging.exists() and not resume:
        shutil.rmtree(staging)
    staging.mkdir(exist_ok=True)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield staging
        if output.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            os.replace(output, trash / output.name)
            os.replace(staging, output)
            shutil.rmtree(trash)
        else:
            os.replace(staging, output)
    except BaseException as error:
        # Bad input found mid-run (AAACError) would stop a resumed run again: its progress is of no use.
        if isinstance(error, AAACError) or not (staging / PROGRESS_DIR).is_dir():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
