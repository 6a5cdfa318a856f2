"""No kernel test builds tensors on a hard-coded device: they follow the ``device`` fixture.

On a GPU machine a Triton launch on CPU tensors compiles and then fails on a CPU pointer, so a
kernel test that builds its inputs on the CPU passes here (under the interpreter) and fails on
the GPU check. This test reads every ``tests/kernels/test_*.py`` (AST) and fails on:

* a tensor factory (``torch.randn``, ``rand``, ``randint``, ``randperm``, ``tensor``,
  ``as_tensor``, ``zeros``, ``ones``, ``full``, ``empty``, ``arange``, ``linspace``, ``eye``,
  ``Generator``) without a ``device=`` keyword, or with a literal one;
* ``.cpu()`` / ``.cuda()`` calls and the literals ``"cpu"`` / ``"cuda"`` (a module-level
  ``DEV = "cuda" if ... else "cpu"`` included);
* a ``test_*`` function that builds tensors itself but does not take the ``device`` fixture.

A line that must stay on the host (a Python-side table, never a kernel input) says so with a
``# host: <reason>`` comment; the checker accepts those lines only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

KERNEL_TESTS = Path(__file__).resolve().parent
FACTORIES = {
    "randn", "rand", "randint", "randperm", "tensor", "as_tensor", "zeros", "ones", "full", "empty",
    "arange", "linspace", "eye", "Generator",
}  # fmt: skip
DEVICE_LITERALS = {"cpu", "cuda"}
PRAGMA = "# host:"


def _is_factory(node: ast.Call) -> bool:
    f = node.func
    return (
        isinstance(f, ast.Attribute)
        and f.attr in FACTORIES
        and isinstance(f.value, ast.Name)
        and f.value.id == "torch"
    )


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def device_violations(source: str, name: str = "<test>") -> list[str]:
    """Every hard-coded device in ``source`` (a kernel test module), as ``name:line: what``."""
    tree = ast.parse(source)
    lines = source.splitlines()
    docstrings = _docstring_nodes(tree)
    found = []

    def flag(node: ast.AST, what: str) -> None:
        line = lines[node.lineno - 1] if node.lineno <= len(lines) else ""
        end = getattr(node, "end_lineno", node.lineno) or node.lineno
        span = lines[node.lineno - 1 : end]
        if any(PRAGMA in ln for ln in span) or PRAGMA in line:
            return
        found.append(f"{name}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if _is_factory(node):
                kw = {k.arg: k.value for k in node.keywords}
                if "device" not in kw:
                    flag(node, f"torch.{node.func.attr}(...) without device=")
                elif isinstance(kw["device"], ast.Constant):
                    flag(node, f"torch.{node.func.attr}(..., device={kw['device'].value!r})")
            elif isinstance(node.func, ast.Attribute) and node.func.attr in ("cpu", "cuda") and not node.args:
                flag(node, f".{node.func.attr}()")
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
            and node.value.split(":")[0] in DEVICE_LITERALS
        ):
            flag(node, f"device literal {node.value!r}")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_"):
            params = {a.arg for a in node.args.args + node.args.kwonlyargs}
            builds = any(isinstance(n, ast.Call) and _is_factory(n) for n in ast.walk(node))
            if builds and "device" not in params:
                flag(node, f"{node.name} builds tensors without the device fixture")
    return found


def _kernel_test_files() -> list[Path]:
    return sorted(p for p in KERNEL_TESTS.glob("test_*.py") if p.name != Path(__file__).name)


def test_checker_flags_hard_coded_devices():
    """The checker itself: each way of pinning a device is caught, the fixture's way is not."""
    bad = '''
import torch
DEV = "cuda" if torch.cuda.is_available() else "cpu"

def helper(n):
    return torch.randn(n, generator=torch.Generator().manual_seed(0))

def test_a():
    x = torch.zeros(3, device="cpu")
    return x.cpu()

def test_b(device):
    return torch.arange(4, device=device).cuda()
'''
    found = device_violations(bad)
    assert len(found) == 9, found  # device="cpu" counts twice: a literal device and a "cpu" literal
    for what in ("'cuda'", "'cpu'", "torch.randn(...) without device=", "torch.Generator(...) without",
                 "device='cpu'", ".cpu()", ".cuda()", "test_a builds tensors without"):  # fmt: skip
        assert any(what in f for f in found), (what, found)
    good = '''
import torch

def helper(n, device):
    g = torch.Generator(device=device).manual_seed(0)
    return torch.randn(n, generator=g, device=device)

def test_a(device):
    lengths = torch.tensor([3, 4]).tolist()  # host: Python-side lengths
    return helper(3, device) + torch.ones(3, device=device)
'''
    assert device_violations(good) == []


def test_kernel_tests_follow_the_device_fixture():
    files = _kernel_test_files()
    assert len(files) >= 7, files  # flash, moba, lightning, gdn, cross entropy, moe, production shapes ...
    found = [v for p in files for v in device_violations(p.read_text(), p.name)]
    assert not found, "kernel tests pin a device (use the `device` fixture):\n" + "\n".join(found)


@pytest.mark.parametrize("name", ["test_flash_attn.py", "test_moba.py", "test_lightning_triton.py",
                                  "test_gdn_triton.py", "test_cross_entropy.py", "test_moe_grouped.py"])  # fmt: skip
def test_every_kernel_test_module_uses_the_fixture(name):
    tree = ast.parse((KERNEL_TESTS / name).read_text())
    tests = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
    with_device = [t.name for t in tests if "device" in {a.arg for a in t.args.args}]
    assert tests and len(with_device) >= len(tests) // 2, (name, with_device)


def test_fixture_follows_the_machine(device):
    import os

    import torch

    if torch.cuda.is_available():
        assert device.type == "cuda"
    else:  # the CPU under the Triton interpreter
        assert device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
