"""Bad GGUF files give clear errors naming the file and the problem; nothing is partially written."""

import struct

import numpy as np
import pytest

from lmstack.checkpoints import load_model
from lmstack.checkpoints.gguf import load_gguf, read_gguf
from lmstack.checkpoints.gguf_tokenizer import gguf_tokenizer_json
from lmstack.cli import main
from lmstack.errors import CheckpointError, ConfigError

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")
from tests.parity.gguf_writer import hf_reference, write_gguf  # noqa: E402


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    tokenizer = {"tokenizer.ggml.model": ("gpt2", gguf.GGUFValueType.STRING),
                 "tokenizer.ggml.pre": ("no-such-pre", gguf.GGUFValueType.STRING)}
    write_gguf(path, hf_reference("llama"), "llama", "Q8_0", tokenizer=tokenizer)
    return path


@pytest.mark.parametrize("keep", [3, 20, 200, 5000, -100])
def test_truncated_files(good, tmp_path, keep):
    data = good.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match=r"cut\.gguf: (truncated|not a GGUF|corrupted)"):
        load_gguf(cut)


def test_corrupted_counts_and_magic(good, tmp_path):
    data = bytearray(good.read_bytes())
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:8] + struct.pack("<Q", 2**60) + data[16:])
    with pytest.raises(CheckpointError, match="corrupted GGUF header"):
        read_gguf(bad)
    bad.write_bytes(b"GGUF" + struct.pack("<I", 1) + data[8:])
    with pytest.raises(CheckpointError, match="GGUF version 1 is not supported"):
        read_gguf(bad)
    bad.write_bytes(b"NOPE" + data[4:])
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        read_gguf(bad)
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        read_gguf(tmp_path / "missing.gguf")


def test_unknown_architecture_and_tensor_type(tmp_path):
    path = tmp_path / "falcon.gguf"
    writer = gguf.GGUFWriter(str(path), "falcon")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        step()
    writer.close()
    with pytest.raises(ConfigError, match="GGUF architecture 'falcon' is not supported"):
        load_gguf(path)
    path = tmp_path / "iq.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((1, 66), np.uint8), raw_dtype=gguf.GGMLQuantizationType.IQ2_XXS)
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        step()
    writer.close()
    with pytest.raises(CheckpointError, match="has type IQ2_XXS, which lmstack cannot read"):
        load_model(path)


def test_unknown_pre_tokenizer_is_named(good):
    with pytest.raises(CheckpointError, match="tokenizer.ggml.pre 'no-such-pre' names a pre-tokenizer"):
        gguf_tokenizer_json(read_gguf(good).metadata, str(good))


def test_convert_of_a_bad_file_writes_nothing(good, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", str(good), str(out)]) == 2
    assert "tokenizer.ggml.pre 'no-such-pre'" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
