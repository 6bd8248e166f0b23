"""Collects the stdlib-docs corpus; run as a script in a fresh, isolated interpreter.

Run in-process, the result would depend on what the caller has imported or patched (pytest
replaces `sys.unraisablehook`, `logging.captureWarnings` replaces `warnings.showwarning`, ...),
so `mop.data.corpus.stdlib_documents` runs this file with `python -I -S` and reads the JSON list
of documents from stdout. It imports only the standard library.

Documents, in a fixed order: one per module docstring, one per public class (its docstring and
its own methods' docstrings) or function defined in each module of a fixed, sorted list, then one
per topic of the interpreter's language-reference help (`pydoc_data.topics`). Modules that fail
to import are skipped; modules with import side effects are not on the list.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import sys
import warnings

MIN_DOC_CHARS = 32

# Sorted; no tkinter/turtle/idlelib/antigravity/this/webbrowser (GUI, browser or print on import).
STDLIB_MODULES = tuple(sorted("""
abc argparse ast asyncio base64 bdb binascii bisect builtins bz2 calendar cmath cmd code codecs
codeop collections collections.abc colorsys compileall concurrent.futures configparser contextlib
contextvars copy copyreg csv ctypes dataclasses datetime decimal difflib dis doctest email
email.message email.parser email.utils enum errno filecmp fileinput fnmatch fractions ftplib
functools gc getopt getpass gettext glob graphlib gzip hashlib heapq hmac html html.parser http
http.client http.cookies http.server imaplib importlib importlib.metadata importlib.resources
inspect io ipaddress itertools json json.decoder json.encoder keyword linecache locale logging
logging.handlers lzma mailbox marshal math mimetypes multiprocessing multiprocessing.pool numbers
operator optparse os os.path pathlib pdb pickle pickletools pkgutil platform plistlib poplib
posixpath pprint profile pstats pyclbr pydoc queue quopri random re reprlib rlcompleter runpy sched
secrets select selectors shelve shlex shutil signal site smtplib socket socketserver sqlite3 ssl
stat statistics string stringprep struct subprocess symtable sys sysconfig tabnanny tarfile
tempfile textwrap threading time timeit token tokenize tomllib trace traceback tracemalloc types
typing unicodedata unittest unittest.mock urllib.error urllib.parse urllib.request
urllib.robotparser uuid warnings wave weakref wsgiref xml.dom.minidom xml.etree.ElementTree xml.sax
zipfile zipimport zlib zoneinfo
""".split()))


def _import_quietly(name: str):
    """The module, or None when it cannot be imported here (optional C extensions, etc.)."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return importlib.import_module(name)
    except Exception:
        return None


def _doc(obj) -> str | None:
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) and doc.strip() else None


def _object_document(module_name: str, attr: str, obj) -> str | None:
    """A class (with its own methods and properties) or a function, as one document."""
    parts = []
    doc = _doc(obj)
    if doc:
        parts.append(f"{module_name}.{attr}\n\n{doc}")
    if inspect.isclass(obj):
        for member_name, member in sorted(vars(obj).items()):
            if member_name.startswith("_") and member_name != "__init__":
                continue
            if not (inspect.isroutine(member) or isinstance(member, (staticmethod, classmethod, property))):
                continue
            member_doc = _doc(member)
            if member_doc:
                parts.append(f"{module_name}.{attr}.{member_name}\n\n{member_doc}")
    return "\n\n".join(parts) if parts else None


def _module_documents(name: str, module) -> list[str]:
    docs = []
    doc = _doc(module)
    if doc:
        docs.append(f"Module {name}\n\n{doc}")
    for attr, obj in sorted(vars(module).items()):
        # Only objects defined in this module: re-exports would repeat the same docstrings.
        if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if getattr(obj, "__module__", None) != name:
            continue
        text = _object_document(name, attr, obj)
        if text:
            docs.append(text)
    return docs


def collect_documents() -> list[str]:
    """The documents, read from the modules as this interpreter has them (see module doc)."""
    docs: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated aliases (typing.io, ...) warn on access
        for name in STDLIB_MODULES:
            module = _import_quietly(name)
            if module is not None:
                docs.extend(_module_documents(name, module))
    topics = _import_quietly("pydoc_data.topics")
    if topics is not None:
        docs.extend(f"{key}\n\n{text.strip()}" for key, text in sorted(topics.topics.items()))
    seen: set[str] = set()
    unique = []
    for doc in docs:
        if len(doc) >= MIN_DOC_CHARS and doc not in seen:
            seen.add(doc)
            unique.append(doc)
    return unique



if __name__ == "__main__":
    json.dump(collect_documents(), sys.stdout)
