"""API reference from the docstrings: one Markdown page per public module.

    python docs/make_api.py [OUT_DIR]        (default docs/api/, git-ignored; `make docs`)

Pages: pyencoder, pyencoder.ops, pyencoder.nn, pyencoder.streaming, pyencoder.models,
pyencoder.hf, pyencoder.distill, plus index.md. A module's public names are its ``__all__``; each
gets its signature and docstring, a class also its public methods and properties (those it defines
itself, not nn.Module's). Plain ``inspect``: no dependency, nothing imported beyond the package
(and transformers, for pyencoder.hf), no CUDA initialisation, no network. ``missing_docstrings()``
lists public names (``__all__``) without a docstring: tests/test_docs.py requires none (methods
such as ``step`` / ``flush`` / ``init_state`` may rely on their class's docstring).
"""
import importlib
import inspect
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ("pyencoder", "pyencoder.ops", "pyencoder.nn", "pyencoder.streaming",
           "pyencoder.models", "pyencoder.hf", "pyencoder.distill",
           "pyencoder.compat.causal_conv1d")


def _public(mod):
    names = getattr(mod, "__all__", None)
    if names is None:
        names = [n for n, v in vars(mod).items() if not n.startswith("_")
                 and getattr(v, "__module__", "").startswith("pyencoder")]
    return [(n, getattr(mod, n)) for n in names]


def _members(cls):
    """Public methods / properties the class (or a pyencoder base) defines itself."""
    out = []
    seen = set()
    for klass in cls.__mro__:
        if not klass.__module__.startswith("pyencoder"):
            continue
        for n, v in vars(klass).items():
            if n.startswith("_") or n in seen:
                continue
            if isinstance(v, (staticmethod, classmethod)):
                v = v.__func__
            if inspect.isfunction(v) or isinstance(v, property):
                seen.add(n)
                out.append((n, v))
    return sorted(out)


def _sig(obj, name):
    try:
        return f"{name}{inspect.signature(obj)}"
    except (TypeError, ValueError):
        return name


def _kind(obj):
    if inspect.isclass(obj):
        return "class"
    if callable(obj):
        return "function"
    return "constant"


def _doc(obj):
    return inspect.getdoc(obj) or ""


def _has_own_doc(obj):
    if inspect.isclass(obj) or inspect.isroutine(obj) or isinstance(obj, property):
        return bool(obj.__doc__ and obj.__doc__.strip())
    return True   # constants: documented by the module


def missing_docstrings(modules=MODULES, members=False):
    """['module.name', ...] public objects (the modules' ``__all__``) without a docstring; with
    ``members=True`` also the public methods / properties of the public classes."""
    out = []
    for modname in modules:
        mod = importlib.import_module(modname)
        if not (mod.__doc__ or "").strip():
            out.append(modname)
        for name, obj in _public(mod):
            if not _has_own_doc(obj):
                out.append(f"{modname}.{name}")
            if members and inspect.isclass(obj):
                for mname, m in _members(obj):
                    if not _has_own_doc(m):
                        out.append(f"{modname}.{name}.{mname}")
    return out


def _block(text):
    return "```\n" + text + "\n```\n" if text else ""


def page(modname):
    mod = importlib.import_module(modname)
    lines = [f"# `{modname}`\n", _block(_doc(mod))]
    public = _public(mod)
    lines.append("| name | kind |\n|---|---|")
    seen = {}
    for n, o in public:   # GitHub's heading anchors: lower case, "-1", "-2" for repeats
        a = n.lower()
        anchor = a if a not in seen else f"{a}-{seen[a]}"
        seen[a] = seen.get(a, 0) + 1
        lines.append(f"| [`{n}`](#{anchor}) | {_kind(o)} |")
    lines.append("")
    for name, obj in public:
        lines.append(f"## {name}\n")
        if inspect.isclass(obj) or callable(obj):
            lines.append(_block(_sig(obj, name)))
            lines.append(_doc(obj) + "\n")
        else:
            lines.append(_block(f"{name} = {obj!r}"))
        if inspect.isclass(obj):
            for mname, m in _members(obj):
                if isinstance(m, property):
                    lines.append(f"### {name}.{mname} (property)\n")
                else:
                    lines.append(f"### {name}.{mname}\n")
                    lines.append(_block(_sig(m, mname)))
                lines.append(_doc(m) + "\n")
    return "\n".join(lines)


def build(out_dir):
    """Write <out_dir>/<module>.md for every module and index.md; returns the written paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    index = ["# pyencoder API reference\n",
             "Generated from the docstrings by `python docs/make_api.py` (`make docs`).\n"]
    for modname in MODULES:
        path = os.path.join(out_dir, f"{modname}.md")
        with open(path, "w") as f:
            f.write(page(modname))
        paths.append(path)
        first = (_doc(importlib.import_module(modname)).splitlines() or [""])[0]
        index.append(f"- [`{modname}`]({modname}.md): {first}")
    path = os.path.join(out_dir, "index.md")
    with open(path, "w") as f:
        f.write("\n".join(index) + "\n")
    paths.append(path)
    return paths


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    out = argv[0] if argv else os.path.join(ROOT, "docs", "api")
    for p in build(out):
        print(p)
    undocumented_members = missing_docstrings(members=True)
    missing = missing_docstrings()
    if len(undocumented_members) > len(missing):
        print(f"note: {len(undocumented_members) - len(missing)} public methods / properties "
              f"rely on their class or module docstring", file=sys.stderr)
    if missing:
        print(f"{len(missing)} public names without a docstring: {', '.join(missing)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
