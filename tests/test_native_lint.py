"""Text checks over the C sources: patterns that are easy to get wrong and
hard to test for."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from support import cycles_in

NATIVE = Path(__file__).resolve().parent.parent / "src" / "pagefork" / "_native"
if not NATIVE.is_dir():  # CI also runs the suite against an installed wheel, from a copy of tests/
    pytest.skip(f"no C sources at {NATIVE} (tests run outside the source tree)", allow_module_level=True)
SOURCES = sorted(NATIVE.glob("*.c")) + sorted((NATIVE.parent / "_baseline").glob("*.c"))


def functions(text: str):
    """(name, body) of each top-level C function."""
    for match in re.finditer(r"^[a-zA-Z][^;{}()]*\b(\w+)\([^;{}]*\)\s*\{", text, re.M):
        start, depth = match.end(), 1
        i = start
        while depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        yield match.group(1), text[start:i]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_allow_threads_blocks_are_balanced_and_never_return(path):
    for name, body in functions(path.read_text()):
        begins = body.count("Py_BEGIN_ALLOW_THREADS")
        assert begins == body.count("Py_END_ALLOW_THREADS"), f"{path.name}:{name}"
        for block in re.findall(r"Py_BEGIN_ALLOW_THREADS(.*?)Py_END_ALLOW_THREADS", body, re.S):
            assert not re.search(r"\breturn\b|\bgoto\b", block), f"{path.name}:{name} leaves a GIL-free block"
            assert "Py" not in block.replace("PyBuffer", ""), f"{path.name}:{name} calls Python without the GIL"


def test_every_read_only_protection_has_an_unprotect_path():
    text = (NATIVE / "segfault.c").read_text()
    assert "PROT_READ)" in text and "PROT_READ | PROT_WRITE" in text
    uffd = (NATIVE / "uffd.c").read_text()
    assert "UFFDIO_WRITEPROTECT_MODE_WP" in uffd and ".mode = 0" in uffd


def test_signal_handler_stays_async_signal_safe():
    text = (NATIVE / "segfault.c").read_text()
    handler = dict(functions(text))
    for name in ("on_segv", "chain", "is_write_fault", "mark_all", "take_default_action", "park_if_held"):
        body = handler[name]
        for forbidden in ("malloc", "calloc", "free(", "Py", "printf", "pthread_mutex", "fopen",
                          "pf_altstack", "pf_pinned", "pf_spans", "opendir"):
            assert forbidden not in body, f"{name} uses {forbidden}"
    registry = dict(functions((NATIVE / "registry.c").read_text()))
    for name in ("pf_registry_acquire", "pf_registry_release", "pf_range_mark", "pf_current_tid",
                 "pf_range_begin_exclusive", "pf_range_end_exclusive"):
        for forbidden in ("malloc", "calloc", "free(", "Py", "pthread_mutex"):
            assert forbidden not in registry[name], f"{name} uses {forbidden}"


#: What the SIGSEGV handler may call outside pagefork's own sources: system
#: calls' thin wrappers and functions POSIX lists as async-signal-safe, C11
#: atomics, and the handler it chains to (through the saved sigaction).
SIGNAL_SAFE_CALLS = {"memset", "mprotect", "raise", "sigaction", "sigismember", "sigpending",
                     "sched_yield", "syscall", "sa_sigaction", "sa_handler"}


def without_comments(text: str) -> str:
    return re.sub(r"/\*.*?\*/|//[^\n]*", " ", text, flags=re.S)


def test_everything_the_signal_handler_reaches_is_async_signal_safe():
    """Follows every call from on_segv through the native sources (so a
    helper added later is checked too, not only the functions named above)
    and allows only async-signal-safe calls outside them."""
    bodies: dict[str, list[str]] = {}
    for path in NATIVE.glob("*.c"):
        for name, body in functions(without_comments(path.read_text())):
            bodies.setdefault(name, []).append(body)
    keywords = {"if", "else", "while", "for", "switch", "return", "sizeof", "defined"}
    reached, todo, outside = set(), ["on_segv"], {}
    while todo:
        name = todo.pop()
        if name in reached:
            continue
        reached.add(name)
        for body in bodies[name]:
            for call in re.findall(r"\b([A-Za-z_]\w*)\s*\(", body):
                if call in bodies:
                    todo.append(call)
                elif call not in keywords and not call.startswith(("atomic_", "__atomic_")):
                    outside.setdefault(call, name)
    assert {"on_segv", "chain", "pf_registry_acquire", "pf_range_mark"} <= reached
    unsafe = {call: caller for call, caller in outside.items() if call not in SIGNAL_SAFE_CALLS}
    assert unsafe == {}, f"reached from the SIGSEGV handler: {unsafe}"


def test_thread_locals_never_allocate_on_first_use():
    """A __thread variable of a shared object in the general-dynamic TLS
    model may be allocated (malloc) by its first access, which can be in
    the signal handler: every one is initial-exec."""
    for path in SOURCES:
        for line in without_comments(path.read_text()).splitlines():
            if re.search(r"\b(__thread|_Thread_local|thread_local)\b", line):
                assert 'tls_model("initial-exec")' in line, f"{path.name}: {line.strip()}"


def test_native_files_call_each_other_without_cycles():
    """Each C file calls functions of files below it only (the registry and
    helpers below the mechanisms); shared work such as the after-fork
    clean-up goes through hooks a lower file owns, not a circle of calls.
    Function pointers handed over (the method table, fork hooks) are not calls."""
    texts = {p.name: p.read_text() for p in NATIVE.glob("*.c")}
    defined = {name: file for file, text in texts.items() for name, _ in functions(text)
               if name.startswith("pf_")}
    calls = {file: {defined[name] for name in re.findall(r"\b(pf_\w+)\s*\(", text)
                    if defined.get(name, file) != file}
             for file, text in texts.items()}
    assert defined and any(calls.values())
    assert cycles_in(calls) == []


def test_every_arm_goes_around_the_holes():
    """tracking.c arms only through arm_range, which leaves alternate signal
    stacks unprotected (exempt.c): protecting one, even for an instant,
    kills its thread at a signal."""
    bodies = dict(functions((NATIVE / "tracking.c").read_text()))
    callers = [name for name, body in bodies.items() if "ops->arm(" in body]
    assert callers == ["arm_range"]
    segfault = dict(functions((NATIVE / "segfault.c").read_text()))
    for name in ("suspend_range", "resume_range"):  # handler swaps protect the whole range
        assert not re.search(r"mprotect\([^;]*PROT_READ\)", segfault[name])
        assert "protect_around_holes" in segfault[name]
