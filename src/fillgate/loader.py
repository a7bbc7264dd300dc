"""Loading a job or a pipeline from ``path/to/file.py:ClassName`` or
``package.module:ClassName``, and checking it is complete."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from fillgate.errors import JobError
from fillgate.job import Job, validate_job_class
from fillgate.pipeline import Pipeline, validate_pipeline


def load_job(spec: str) -> type[Job]:
    """Load ``path/to/file.py:ClassName`` or ``package.module:ClassName`` (a Job)."""
    cls = load_runnable(spec)
    if not issubclass(cls, Job):
        raise JobError(f"{spec} is a pipeline; use fillgate run (or plan) for pipelines.")
    return cls


def load_runnable(spec: str) -> type[Any]:
    """Load a Job or a Pipeline from ``path/to/file.py:ClassName`` or ``package.module:ClassName``."""
    module_part, sep, class_name = spec.rpartition(":")
    if not sep or not module_part or not class_name:
        raise JobError(
            f"cannot load job {spec!r}: expected path/to/file.py:ClassName or package.module:ClassName."
        )
    if module_part.endswith(".py") or "/" in module_part or "\\" in module_part:
        path = Path(module_part)
        if not path.is_file():
            raise JobError(f"cannot load job {spec!r}: file {path} does not exist.")
        module_name = path.stem
        folder = str(path.resolve().parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise JobError(f"cannot load job {spec!r}: {path} is not a Python file.")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except (Exception, SystemExit, GeneratorExit) as exc:  # sys.exit() at import is a failed import too
            sys.modules.pop(module_name, None)
            raise JobError(
                f"cannot load job {spec!r}: importing {path} failed: {type(exc).__name__}: {exc}"
            ) from exc
    else:
        try:
            module = importlib.import_module(module_part)
        except ModuleNotFoundError as exc:
            raise JobError(f"cannot load job {spec!r}: no module named {exc.name!r}.") from exc
        except (Exception, SystemExit, GeneratorExit) as exc:
            raise JobError(
                f"cannot load job {spec!r}: importing {module_part} failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    cls = getattr(module, class_name, None)
    if cls is None:
        found = sorted(
            n for n, v in vars(module).items()
            if isinstance(v, type) and issubclass(v, Job | Pipeline) and v not in (Job, Pipeline)
        )
        hint = f" Jobs in that module: {', '.join(found)}." if found else ""
        raise JobError(f"cannot load job {spec!r}: {module_part} has no class {class_name!r}.{hint}")
    if isinstance(cls, type) and issubclass(cls, Pipeline) and cls is not Pipeline:
        return validate_pipeline(cls, spec)
    return validate_job_class(cls, spec)
