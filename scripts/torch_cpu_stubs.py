#!/usr/bin/env python3
"""Makes PyPI's CUDA build of torch import and run on the CPU without the ~5.6 GB of
nvidia-* libraries it declares (PyPI serves no CPU-only torch for Linux x86_64).

torch's shared libraries name the CUDA libraries as DT_NEEDED, so the dynamic loader
refuses to load them when those are absent. For every such library that neither
torch/lib nor the system provides, this writes and compiles a stub with the same
soname and symbol versions, defining every symbol torch's libraries take from it; each
stub function returns 100 (cudaErrorNoDevice: a non-zero status every CUDA library
reports as an error). torch.cuda.is_available() is then False and every CPU path is
torch's own code. Needs readelf, nm and a C compiler (binutils and gcc).

Usage: torch_cpu_stubs.py SITE_PACKAGES_DIR   (idempotent; prints what it made)
"""
import ctypes
import pathlib
import re
import subprocess
import sys


def run(*args):
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def needed(lib):
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", run("readelf", "-d", "-W", str(lib)))


def version_files(lib):
    """Version name -> the needed file that must define it (readelf's version-needs section)."""
    out, current = {}, None
    for line in run("readelf", "-V", "-W", str(lib)).splitlines():
        m = re.search(r"File: (\S+)", line)
        if m:
            current = m.group(1)
            continue
        m = re.search(r"Name: (\S+)", line)
        if m and current:
            out[m.group(1)] = current
    return out


def undefined(lib):
    """(symbol, version or None) of every strong undefined dynamic symbol."""
    syms = []
    for line in run("nm", "-D", "--undefined-only", "--with-symbol-versions", str(lib)).splitlines():
        parts = line.split()
        if len(parts) != 2 or parts[0] != "U":
            continue  # weak references ('w') may stay unresolved
        name, _, version = parts[1].partition("@")
        syms.append((name, version.lstrip("@") or None))
    return syms


def defined(lib):
    out = set()
    for line in run("nm", "-D", "--defined-only", str(lib)).splitlines():
        parts = line.split()
        if parts:
            out.add(parts[-1].split("@")[0])
    return out


def loadable(name):
    """Whether the dynamic loader finds `name` on this system (a real CUDA install is used)."""
    try:
        ctypes.CDLL(name)
        return True
    except OSError:
        return False


def main():
    site = pathlib.Path(sys.argv[1])
    libdir = site / "torch" / "lib"
    # torch's own libraries only: stubs of an earlier run are made again, not read.
    libs = sorted(p for p in libdir.glob("*.so*") if p.is_file() and not is_stub(p)) + sorted((site / "torch").glob("_C*.so"))
    in_torch = {p.name for p in libdir.iterdir()}
    stubs = {}  # soname -> {version or None -> set(symbols)}
    torch_defined = set()
    for lib in libs:
        torch_defined |= defined(lib)
    for lib in libs:
        missing = [n for n in needed(lib) if is_stub(libdir / n) or (n not in in_torch and not loadable(n))]
        if not missing:
            continue
        for name in missing:
            stubs.setdefault(name, {})
        owners = version_files(lib)
        for sym, version in undefined(lib):
            if version is not None:
                owner = owners.get(version)
                if owner in missing:
                    stubs[owner].setdefault(version, set()).add(sym)
            elif sym not in torch_defined and not sym.startswith(("Py", "_Py")):
                # Unversioned: no telling which missing library was meant; the first one
                # is in this library's lookup scope, which is all the loader asks.
                stubs[missing[0]].setdefault(None, set()).add(sym)
    build = libdir / ".cuda-stubs"
    build.mkdir(exist_ok=True)
    for soname, by_version in sorted(stubs.items()):
        symbols = sorted(set().union(*by_version.values())) if by_version else []
        src = build / f"{soname}.c"
        src.write_text(STUB_MARK + "\n" + "".join(f"int {s}(void) {{ return 100; }}\n" for s in symbols))
        cmd = ["cc", "-shared", "-fPIC", "-O0", "-w", f"-Wl,-soname,{soname}", "-o", str(libdir / soname), str(src)]
        versions = [v for v in by_version if v is not None]
        if versions:
            unversioned = sorted(by_version.get(None, ()))
            script = build / f"{soname}.map"
            nodes = []
            for i, v in enumerate(sorted(versions)):
                syms = sorted(by_version[v]) + (unversioned if i == 0 else [])
                nodes.append(f"{v} {{ global: {' '.join(s + ';' for s in syms)} }};\n")
            script.write_text("".join(nodes))
            cmd.append(f"-Wl,--version-script,{script}")
        subprocess.run(cmd, check=True)
        print(f"stub {soname}: {len(symbols)} symbols")


STUB_MARK = "/* resbisect torch_cpu_stubs.py: CUDA library stub */"


def is_stub(path):
    # A stub made by an earlier run is regenerated, never mistaken for the real library.
    return (path.parent / ".cuda-stubs" / f"{path.name}.c").is_file()


if __name__ == "__main__":
    main()
