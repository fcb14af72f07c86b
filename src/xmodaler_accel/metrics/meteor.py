"""METEOR 1.5 through pycocoevalcap's jar (Java), with the same protocol as coco-caption.

METEOR's paraphrase tables and stemmer live in the jar, so there is no Python re-implementation:
this module starts ``java -jar meteor-1.5.jar - - -stdio -l en -norm``, sends one ``SCORE`` line
per image and one ``EVAL`` line, and reads the per-image and overall scores back.
"""

from __future__ import annotations

import functools
import importlib.util
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["MeteorUnavailable", "meteor", "meteor_jar", "meteor_missing"]

_LEAVE_OUT = "or leave METEOR out: metrics=('bleu', 'rouge', 'cider')"
_NO_JAR = "METEOR needs pycocoevalcap's meteor-1.5.jar: `pip install 'xmodaler-accel[coco-eval]'` (or pycocoevalcap)"
_NO_JAVA = (
    "METEOR needs Java, but `java` is not on PATH: install a Java runtime (e.g. `apt-get "
    "install default-jre-headless`)"
)


class MeteorUnavailable(RuntimeError):
    """Java or the METEOR jar is missing."""


def _find_jar() -> tuple[Path | None, str]:
    """The jar, or None and what to do about it."""
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        return None, _NO_JAR
    jar = Path(next(iter(spec.submodule_search_locations))) / "meteor" / "meteor-1.5.jar"
    if not jar.exists():
        return None, (
            f"METEOR's jar is not at {jar}: reinstall pycocoevalcap (`pip install "
            "--force-reinstall pycocoevalcap`)"
        )
    return jar, ""


def meteor_jar() -> Path:
    """Path of pycocoevalcap's ``meteor-1.5.jar``; raises :class:`MeteorUnavailable` if absent."""
    jar, problem = _find_jar()
    if jar is None:
        raise MeteorUnavailable(f"{problem} ({_LEAVE_OUT})")
    return jar


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise MeteorUnavailable(f"{_NO_JAVA} {_LEAVE_OUT}")
    return java


def meteor_missing() -> str | None:
    """Why METEOR cannot run here and what to install, or None when it can: the jar is there,
    `java` is on PATH and starts with the heap METEOR asks for (``java -Xmx2G -version``).
    For a check at start, before hours of training end in an evaluation that cannot score."""
    jar, problem = _find_jar()
    if jar is None:
        return problem
    java = shutil.which("java")
    if java is None:
        return _NO_JAVA
    return _java_problem(java)


@functools.cache  # one start of this java per process: every evaluator (split) asks at start
def _java_problem(java: str) -> str | None:
    """Why `java` cannot start with METEOR's heap, or None."""
    try:
        proc = subprocess.run([java, "-Xmx2G", "-version"], capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"METEOR needs Java, and `{java} -version` failed ({err}): repair the Java runtime"
    if proc.returncode != 0:
        lines = proc.stderr.decode(errors="replace").strip().splitlines()
        detail = lines[-1] if lines else f"exit status {proc.returncode}"
        return (
            f"METEOR needs Java, and `{java} -Xmx2G -version` failed ({detail}): repair the "
            "Java runtime"
        )
    return None


def _readline(proc: subprocess.Popen, stderr) -> str:
    line = proc.stdout.readline()
    if not line:
        stderr.seek(0)
        detail = stderr.read().decode(errors="replace").strip()[-2000:]
        raise RuntimeError(f"METEOR (Java) stopped early (exit code {proc.poll()}): {detail}")
    return line.decode().strip()


def meteor(gts: dict, res: dict) -> tuple[float, np.ndarray]:
    """Overall METEOR and per-image scores for tokenised ``res[k]`` against ``gts[k]``."""
    jar = meteor_jar()
    cmd = [_java(), "-jar", "-Xmx2G", jar.name, "-", "-", "-stdio", "-l", "en", "-norm"]
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(
            cmd, cwd=jar.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr
        )
        try:
            stats = []
            for key in gts:
                hyp = res[key].replace("|||", "").replace("  ", " ")
                proc.stdin.write(f"SCORE ||| {' ||| '.join(gts[key])} ||| {hyp}\n".encode())
                proc.stdin.flush()
                stats.append(_readline(proc, stderr))
            proc.stdin.write(("EVAL ||| " + " ||| ".join(stats) + "\n").encode())
            proc.stdin.flush()
            scores = np.array([float(_readline(proc, stderr)) for _ in stats])
            return float(_readline(proc, stderr)), scores
        finally:
            proc.stdin.close()
            proc.kill()
            proc.wait()
