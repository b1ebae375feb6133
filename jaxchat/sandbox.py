"""Running model-written code: the calculator tool (`use_calculator`) and the HumanEval executor (`execute_code`).

Calculator (nanochat-reference.md §8.3, the V0-late/HEAD rules, then two extra layers):
- strip commas; an expression made only of `0123456789*+-/.() ` is arithmetic (`**` refused); anything else must use only
  `[a-zA-Z0-9'"()._ ]`, contain `.count(`, and contain none of the forbidden words (`__`, `import`, `eval`, `open`, ...);
- defence in depth beyond the reference: at most `MAX_EXPR_CHARS` characters, and the parsed AST must be either plain
  arithmetic over number literals, or `<string literal>[.lower()|.upper()|.strip()...].count(<literals>)`. Names, other
  attributes, subscripts, comprehensions, lambdas and `str.format` never reach `eval`;
- `eval(expr, {"__builtins__": {}}, {})` with a time limit that works from any thread (a worker thread joined with a
  timeout; `signal.alarm` only works in the main thread). The limit is a backstop: with `**` refused and the length capped,
  the largest number an expression can build has about `MAX_EXPR_CHARS` digits, so evaluation takes microseconds.

Code execution (§8.4, HEAD's design): each call runs a fresh `python -I -c GUARD` subprocess in its own session, in a fresh
temporary working directory (deleted afterwards), with the environment scrubbed to `PATH=/usr/bin:/bin`, stdin closed,
stdout/stderr captured to files, and a wall-clock timeout that kills the whole process group. The GUARD prelude sets
RLIMIT_AS/RLIMIT_DATA (memory), RLIMIT_FSIZE (file and output size), RLIMIT_NPROC where available, and replaces destructive
calls (os.system, os.kill, os.fork, os.remove, shutil.rmtree, subprocess.Popen, ...) with functions that raise.

What this does NOT protect against — it is a guard against accidents by a small model, not a security sandbox:
- the child runs as the same user: it can read any file the user can, and write files anywhere by absolute path;
- network access, `ctypes`, and re-importing a disabled function through another module are not blocked;
- the calculator is much tighter (no names reach `eval` at all), but relies on CPython's parser and `eval`.
Run untrusted models' code inside a container or VM if that matters.
"""
from __future__ import annotations

import ast
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

# ---------------------------------------------------------------------------------------------------------------------
# Calculator

ARITHMETIC_CHARS = frozenset("0123456789*+-/.() ")
COUNT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'\"()._ ")
FORBIDDEN_WORDS = ("__", "import", "exec", "eval", "compile", "open", "file", "input", "raw_input", "globals",
                   "locals", "vars", "dir", "getattr", "setattr", "delattr", "hasattr")
MAX_EXPR_CHARS = 256  # model-written arithmetic is a few dozen characters; this bounds every number it can build
CALCULATOR_TIMEOUT_S = 3.0  # the reference's alarm
# str methods that take no argument and never grow the string (replace/center/ljust/format/join could).
_SAFE_STR_METHODS = frozenset({"lower", "upper", "strip", "lstrip", "rstrip", "casefold", "swapcase", "title",
                               "capitalize"})
_ARITH_OPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv)  # every operator the reference's charset can spell


def _is_number(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) in (int, float)


def _is_arithmetic(node: ast.AST) -> bool:
    """Number literals combined with + - * / // and unary signs; nothing else."""
    if _is_number(node):
        return True
    if isinstance(node, ast.BinOp):
        return isinstance(node.op, _ARITH_OPS) and _is_arithmetic(node.left) and _is_arithmetic(node.right)
    if isinstance(node, ast.UnaryOp):
        return isinstance(node.op, (ast.UAdd, ast.USub)) and _is_arithmetic(node.operand)
    return False


def _is_string_chain(node: ast.AST) -> bool:
    """A string literal, optionally followed by argument-free, non-growing str methods: 'Hello'.lower()."""
    if isinstance(node, ast.Constant):
        return type(node.value) is str
    return (isinstance(node, ast.Call) and not node.args and not node.keywords
            and isinstance(node.func, ast.Attribute) and node.func.attr in _SAFE_STR_METHODS
            and _is_string_chain(node.func.value))


def _is_count_call(node: ast.AST) -> bool:
    """<string chain>.count(<string literal>). (Commas are stripped first, so start/end arguments cannot occur.)"""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"):
        return False
    if node.keywords or len(node.args) != 1 or not _is_string_chain(node.func.value):
        return False
    return isinstance(node.args[0], ast.Constant) and type(node.args[0].value) is str


def _parse(expr: str) -> ast.AST | None:
    try:
        with warnings.catch_warnings():  # '1 (2)' style SyntaxWarnings are the model's problem, not the console's
            warnings.simplefilter("ignore")
            return ast.parse(expr.strip(), mode="eval").body  # eval() ignores surrounding spaces; ast.parse does not
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None


def _eval_with_timeout(expr: str, timeout_s: float):
    """eval with empty builtins in a worker thread; None on any error or when it outlives the timeout.

    A thread cannot be killed, but the grammar checks above bound the work, so a timed-out thread still ends soon.
    """
    box: dict = {}

    def run():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                box["value"] = eval(expr.strip(), {"__builtins__": {}}, {})  # noqa: S307 — grammar-checked above
        except Exception:  # ZeroDivisionError, OverflowError, ... : the tool returns nothing
            pass

    worker = threading.Thread(target=run, name="calculator", daemon=True)
    worker.start()
    worker.join(timeout_s)
    return None if worker.is_alive() else box.get("value")


def use_calculator(expr: str, timeout_s: float = CALCULATOR_TIMEOUT_S):
    """Evaluate a calculator tool call; None when it is refused or fails (the engine then forces nothing)."""
    if not isinstance(expr, str):
        return None
    expr = expr.replace(",", "")
    if not expr.strip() or len(expr) > MAX_EXPR_CHARS:
        return None
    if all(c in ARITHMETIC_CHARS for c in expr):
        if "**" in expr:
            return None
        node = _parse(expr)
        if node is None or not _is_arithmetic(node):
            return None
    else:
        if not all(c in COUNT_CHARS for c in expr):
            return None
        lowered = expr.lower()
        if any(word in lowered for word in FORBIDDEN_WORDS) or ".count(" not in expr:
            return None
        node = _parse(expr)
        if node is None or not _is_count_call(node):
            return None
    value = _eval_with_timeout(expr, timeout_s)
    if isinstance(value, float) and value != value:  # nan is not an answer
        return None
    return value


# ---------------------------------------------------------------------------------------------------------------------
# Code execution (HumanEval)

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MAX_MEMORY_BYTES = 256 * 1024 * 1024
MAX_OUTPUT_BYTES = 8 * 1024 * 1024  # RLIMIT_FSIZE: bounds captured output and any file the program writes
MAX_CODE_CHARS = 100_000  # the program travels inside argv, whose single-argument limit is 128 KiB on Linux
SCRUBBED_ENV = {"PATH": "/usr/bin:/bin"}


@dataclasses.dataclass(frozen=True)
class ExecutionResult:
    success: bool  # exited with status 0 within the time limit
    stdout: str
    stderr: str
    error: str | None = None  # last line of stderr, or why the process was stopped
    timeout: bool = False
    memory_exceeded: bool = False


# Runs inside the child before the program. It disables functions by replacing them (not deleting them) so the program
# gets a clear PermissionError instead of an AttributeError that looks like a bug in the program.
GUARD = r'''
import builtins, faulthandler, os, platform, resource, shutil, subprocess, sys
faulthandler.disable()
_mem, _fsize = {mem}, {fsize}
if platform.uname().system != "Darwin":  # macOS refuses RLIMIT_AS/DATA changes
    for _lim in (resource.RLIMIT_AS, resource.RLIMIT_DATA):
        resource.setrlimit(_lim, (_mem, _mem))
resource.setrlimit(resource.RLIMIT_FSIZE, (_fsize, _fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

def _disabled(name):
    def refuse(*args, **kwargs):
        raise PermissionError(name + " is disabled in the jaxchat sandbox")
    return refuse

for _mod, _names in (
    (os, ("kill", "killpg", "system", "putenv", "unsetenv", "remove", "removedirs", "rmdir", "fchdir", "setuid",
          "fork", "forkpty", "vfork", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod",
          "chown", "chroot", "lchflags", "lchmod", "lchown", "chdir", "execv", "execve", "execvp", "execvpe", "execl",
          "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnl", "spawnle", "popen", "posix_spawn",
          "posix_spawnp", "startfile", "plock")),
    (shutil, ("rmtree", "move", "chown")),
    (subprocess, ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput")),
    (builtins, ("exit", "quit", "help")),
):
    for _name in _names:
        if hasattr(_mod, _name):
            setattr(_mod, _name, _disabled(_mod.__name__ + "." + _name))
for _blocked in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
    sys.modules[_blocked] = None
exec(compile({code!r}, "<llm>", "exec"), {{"__name__": "__main__"}})
'''


def _guarded_program(code: str, max_memory_bytes: int) -> str:
    return GUARD.format(mem=int(max_memory_bytes), fsize=MAX_OUTPUT_BYTES, code=code)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read(path: Path) -> str:
    return path.read_bytes()[:MAX_OUTPUT_BYTES].decode("utf-8", errors="replace")


def _stop_reason(returncode: int, stderr: str) -> str | None:
    if returncode == 0:
        return None
    if returncode < 0:
        sig = signal.Signals(-returncode).name if -returncode in signal.Signals._value2member_map_ else str(-returncode)
        hint = " (output or file size limit)" if sig == "SIGXFSZ" else ""
        return f"killed by {sig}{hint}"
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit status {returncode}"


def execute_code(code: str, timeout: float = DEFAULT_TIMEOUT_S,
                 maximum_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES) -> ExecutionResult:
    """Run `code` in a fresh guarded Python subprocess (see the module docstring for what that does and does not stop)."""
    if len(code) > MAX_CODE_CHARS:
        raise ValueError(f"program has {len(code):,} characters; execute_code takes at most {MAX_CODE_CHARS:,}")
    with tempfile.TemporaryDirectory(prefix="jaxchat-sandbox-") as tmp:
        workdir, capture = Path(tmp) / "cwd", Path(tmp) / "capture"
        workdir.mkdir()
        capture.mkdir()
        out_path, err_path = capture / "stdout", capture / "stderr"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _guarded_program(code, maximum_memory_bytes)],
                cwd=workdir, env=dict(SCRUBBED_ENV), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True,  # its own process group, so a timeout kills anything it started too
            )
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc)  # also reaps children left behind by a program that exited normally
            proc.wait()
        stdout, stderr = _read(out_path), _read(err_path)
    memory = "MemoryError" in stderr
    if timed_out:
        return ExecutionResult(False, stdout, stderr, f"timed out after {timeout:g} s", True, memory)
    return ExecutionResult(proc.returncode == 0, stdout, stderr, _stop_reason(proc.returncode, stderr), False, memory)
