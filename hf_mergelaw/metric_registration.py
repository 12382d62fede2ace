"""Make ``evaluate.load("merge_scaling")`` find the metric, offline, in any process.

``evaluate.load`` resolves a bare name from ``./merge_scaling/``, then the Hub, then its modules
cache: ``$HF_MODULES_CACHE/evaluate_modules/metrics/evaluate-metric--merge_scaling/<64 hex>/``.
``register_metric`` writes a thin shim there that imports the metric from the installed package::

    from hf_mergelaw.metric_registration import register_metric
    register_metric()                       # what `hf-mergelaw register-metric` runs
    register_metric("/data/hf/modules")     # another HF_MODULES_CACHE

The import hook calls ``register_metric()`` right after ``evaluate`` is imported, so a plain
``evaluate.load("merge_scaling")`` works after ``pip install hf-mergelaw``. This module imports only
the standard library: it runs in every process that imports evaluate.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

METRIC_NAME = "merge_scaling"

SHIM_SOURCE = '''\
"""evaluate.load("merge_scaling") entry point written by hf-mergelaw (hf-mergelaw register-metric).

The metric itself lives in the installed hf_mergelaw package.
"""

try:
    from hf_mergelaw.metrics.merge_scaling import MergeScaling
except ModuleNotFoundError as error:
    if error.name is None or error.name.partition(".")[0] != "hf_mergelaw":
        raise
    raise ModuleNotFoundError(
        "The merge_scaling metric comes from the hf-mergelaw package, which this Python cannot "
        "import: pip install hf-mergelaw (or delete this cached shim: " + __file__ + ")."
    ) from error

__all__ = ["MergeScaling"]
'''


def metric_path() -> str:
    """Path of the metric script, for ``evaluate.load`` without registration.

    >>> import evaluate, hf_mergelaw
    >>> metric = evaluate.load(hf_mergelaw.metric_path())
    """
    return str(Path(__file__).with_name("metrics") / f"{METRIC_NAME}.py")


def register_metric(modules_cache: str | os.PathLike | None = None) -> Path:
    """Write the ``merge_scaling`` shim into evaluate's modules cache; return the shim's path.

    ``modules_cache`` is evaluate's ``HF_MODULES_CACHE`` (default: the one evaluate uses,
    ``$HF_MODULES_CACHE`` or ``$HF_HOME/modules``). Idempotent: the folder name is the SHA-256 of
    the shim, and an existing shim is only made the newest (evaluate picks the newest folder).
    Concurrent calls are safe: the folder appears complete or not at all.

    >>> register_metric()  # doctest: +ELLIPSIS
    PosixPath('.../modules/evaluate_modules/metrics/evaluate-metric--merge_scaling/.../merge_scaling.py')
    """
    metrics = Path(modules_cache or _default_modules_cache()) / "evaluate_modules" / "metrics"
    name_dir = metrics / f"evaluate-metric--{METRIC_NAME}"
    name_dir.mkdir(parents=True, exist_ok=True)
    for package in (metrics.parent, metrics, name_dir):
        # Create only: touching an existing file fails in a shared read-only cache.
        if not (package / "__init__.py").exists():
            (package / "__init__.py").touch()
    digest = hashlib.sha256(SHIM_SOURCE.encode()).hexdigest()
    shim = name_dir / digest / f"{METRIC_NAME}.py"
    if not _holds_shim(shim):
        _publish_hash_folder(name_dir, digest)
    _make_newest(shim)
    return shim


def register_metric_command(args) -> int:
    """CLI ``hf-mergelaw register-metric [--modules-cache DIR] [--json]``: print the shim path."""
    shim = register_metric(getattr(args, "modules_cache", None))
    print(json.dumps({"path": str(shim)}) if getattr(args, "json", False) else shim)
    return 0


def _default_modules_cache() -> str:
    config = sys.modules.get("evaluate.config")
    if config is not None:
        # evaluate read the environment when it was imported; follow what it will look at.
        return str(config.HF_MODULES_CACHE)
    # The same resolution as evaluate.config, without importing evaluate (torch, triton: seconds).
    hf_home = os.getenv(
        "HF_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    )
    return os.getenv("HF_MODULES_CACHE", os.path.join(os.path.expanduser(hf_home), "modules"))


def _holds_shim(path: Path) -> bool:
    try:
        return path.read_text(encoding="utf-8") == SHIM_SOURCE
    except OSError:
        return False


def _publish_hash_folder(name_dir: Path, digest: str) -> None:
    """Build the hash folder under a temporary name and rename it into place.

    evaluate lists every 64-character folder and reads its script's mtime, so a half-written
    folder would break a concurrent ``evaluate.load``.
    """
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=name_dir))
    try:
        staging.chmod(0o755)  # mkdtemp's 0o700 would hide the metric from other users of the cache
        (staging / "__init__.py").touch()
        (staging / f"{METRIC_NAME}.py").write_text(SHIM_SOURCE, encoding="utf-8")
        final = name_dir / digest
        if final.exists() and not _holds_shim(final / f"{METRIC_NAME}.py"):
            shutil.rmtree(final, ignore_errors=True)  # edited by hand: replace it
        try:
            staging.rename(final)
        except OSError:
            if not _holds_shim(final / f"{METRIC_NAME}.py"):
                raise  # not a concurrent registration winning the race
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _make_newest(shim: Path) -> None:
    """Give the shim the newest mtime of its siblings if it lacks it (e.g. after a downgrade)."""
    others = [
        folder / shim.name
        for folder in shim.parent.parent.iterdir()
        if len(folder.name) == 64 and folder != shim.parent and (folder / shim.name).exists()
    ]
    newest = max((other.stat().st_mtime for other in others), default=-math.inf)
    if newest >= shim.stat().st_mtime:
        when = max(time.time(), newest + 1)
        os.utime(shim, (when, when))
