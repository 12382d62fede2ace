"""The post-import hook in `_hf_mergelaw_hook`, on stand-in modules, in fresh interpreters.

Each case writes a trigger package and a callback module to a temporary directory and runs a
short script with `python -S` (no site-packages, so no installed hook interferes).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def modules(tmp_path: Path) -> Path:
    """`trigger.sub` (the watched module) and `plugin.register` (its callback)."""
    (tmp_path / "trigger").mkdir()
    (tmp_path / "trigger" / "__init__.py").write_text("")
    (tmp_path / "trigger" / "sub.py").write_text(
        "import sys\nREADY = True\nsys.events.append('sub')\n"
    )
    (tmp_path / "plugin.py").write_text(
        textwrap.dedent(
            """
            import sys
            import trigger.sub

            def register():  # idempotent, and called on import, like mergekit_plugins.register
                assert trigger.sub.READY
                if "register" not in sys.events:
                    sys.events.append("register")

            register()
            """
        )
    )
    return tmp_path


def _run(directory: Path, script: str) -> subprocess.CompletedProcess:
    prelude = (
        "import sys, warnings; sys.events = []; warnings.simplefilter('always');"
        "import _hf_mergelaw_hook as hook; TRIGGERS = {'trigger.sub': 'plugin:register'};"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(directory), str(REPO)]))
    return subprocess.run(
        [sys.executable, "-S", "-c", prelude + textwrap.dedent(script)],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )


def test_callback_runs_once_after_the_trigger_executes(modules: Path) -> None:
    result = _run(
        modules,
        """
        hook.install(TRIGGERS); hook.install(TRIGGERS)
        import trigger.sub, trigger.sub
        print(sys.events, sum(getattr(f, 'is_hf_mergelaw_hook', False) for f in sys.meta_path))
        """,
    )
    assert result.stdout.split("\n")[0] == "['sub', 'register'] 1"


def test_probing_with_find_spec_does_not_consume_the_trigger(modules: Path) -> None:
    result = _run(
        modules,
        """
        import importlib.util
        hook.install(TRIGGERS)
        assert importlib.util.find_spec('trigger.sub') is not None
        import trigger.sub
        print(sys.events)
        """,
    )
    assert result.stdout.strip() == "['sub', 'register']"


def test_importing_the_plugin_first_registers_once_without_warning(modules: Path) -> None:
    result = _run(modules, "hook.install(TRIGGERS)\nimport plugin\nprint(sys.events)")
    assert result.stdout.strip() == "['sub', 'register']"
    assert "Warning" not in result.stderr


def test_trigger_already_imported_fires_on_install(modules: Path) -> None:
    result = _run(modules, "import trigger.sub\nhook.install(TRIGGERS)\nprint(sys.events)")
    assert result.stdout.strip() == "['sub', 'register']"


def test_failing_callback_warns_and_the_import_still_works(modules: Path) -> None:
    result = _run(
        modules,
        """
        hook.install({'trigger.sub': 'plugin:missing_function'})
        import trigger.sub
        print(trigger.sub.READY)
        """,
    )
    assert result.stdout.strip() == "True"
    assert "RuntimeWarning" in result.stderr and "plugin:missing_function" in result.stderr


def test_hook_module_imports_nothing_but_itself() -> None:
    script = (
        "import sys; before = set(sys.modules); import _hf_mergelaw_hook as h; h.install();"
        "print(sorted(set(sys.modules) - before))"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-S", "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "['__future__', '_hf_mergelaw_hook']"


def test_pth_line_installs_the_mergekit_trigger() -> None:
    (line,) = (REPO / "hf_mergelaw_hook.pth").read_text().splitlines()
    assert line == "import _hf_mergelaw_hook; _hf_mergelaw_hook.install()"
    import _hf_mergelaw_hook

    assert _hf_mergelaw_hook.TRIGGERS["mergekit.merge_methods"] == "mergekit_plugins:register"
