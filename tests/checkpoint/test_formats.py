"""Every checkpoint format yields the same weights, detected from content not file names."""

from __future__ import annotations

import pickle
import struct

import pytest
import torch

from tests.formats import write_hf, write_llama2c_bin, write_llama2c_versioned, write_meta
from tests.support import STORIES_BIN, PickleBomb, random_args, random_state_dict
from torchchat.builder import build_transformer
from torchchat.checkpoint import load_checkpoint
from torchchat.checkpoint.native import save_native
from torchchat.errors import TorchchatError


def logits_of(args, sd):
    model = build_transformer(args, sd, torch.float32, "cpu")
    model.setup_caches(1, 16)
    tokens = torch.arange(10).remainder(args.vocab_size)[None]
    with torch.no_grad():
        return model(tokens, torch.arange(10))


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def model(request):
    args = random_args(tie_embeddings=request.param, n_kv_heads=2)
    return args, random_state_dict(args, seed=5)


def test_all_formats_give_identical_logits(tmp_path, model):
    args, sd = model
    reference = logits_of(args, sd)
    paths = {
        "native": tmp_path / "n" / "weights.bin",  # odd name on purpose: detection is by content
        "hf": write_hf(tmp_path / "hf", sd, args),
        "hf-sharded-bin": write_hf(tmp_path / "hfb", sd, args, shards=3, safetensors=False),
        "meta": write_meta(tmp_path / "meta", sd, args, shards=2),
        "llama2c": write_llama2c_bin(tmp_path / "model.dat", sd, args),
    }
    paths["native"].parent.mkdir()
    save_native(paths["native"], args, sd)
    for fmt, path in paths.items():
        ckpt = load_checkpoint(path)
        assert ckpt.args is not None, fmt
        for field in (
            "dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "vocab_size",
            "hidden_dim",
            "tie_embeddings",
        ):
            assert getattr(ckpt.args, field) == getattr(args, field), (fmt, field)
        got = logits_of(args, ckpt.state_dict)
        assert torch.equal(got, reference), fmt


@pytest.mark.parametrize("version", [1, 2])
def test_llama2c_versioned_exports(tmp_path, model, version):
    args, sd = model
    held = write_llama2c_versioned(tmp_path / "m.bin", sd, args, version)
    ckpt = load_checkpoint(tmp_path / "m.bin")
    assert ckpt.args.tie_embeddings == args.tie_embeddings
    assert ckpt.state_dict.keys() == held.keys()
    for name, t in held.items():
        assert torch.equal(ckpt.state_dict[name], t), name
    if version == 2:  # int8 really was read (values differ from fp32)
        assert not torch.equal(
            held["layers.0.attention.wq.weight"], sd["layers.0.attention.wq.weight"]
        )


def test_stories260k_header():
    ckpt = load_checkpoint(STORIES_BIN)
    a = ckpt.args
    assert (a.dim, a.hidden_dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size, a.max_seq_len) == (
        64, 172, 5, 8, 4, 512, 512,
    )  # fmt: skip
    assert a.tie_embeddings and ckpt.format == "llama2c-bin"


def test_llama2c_pt_training_checkpoint(tmp_path):
    args = random_args(n_kv_heads=2, hidden_dim=None, multiple_of=16, tie_embeddings=True)
    sd = random_state_dict(args)
    path = tmp_path / "ckpt.pt"
    model_args = dict(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=2,
                      vocab_size=args.vocab_size, multiple_of=16, max_seq_len=args.max_seq_len, dropout=0.0)  # fmt: skip
    torch.save(
        {
            "model": {f"_orig_mod.{k}": v for k, v in sd.items()},
            "model_args": model_args,
            "iter_num": 3,
        },
        path,
    )
    ckpt = load_checkpoint(path)
    assert ckpt.format == "llama2c-pt" and ckpt.args.hidden_dim == args.hidden_dim
    assert torch.equal(logits_of(ckpt.args, ckpt.state_dict), logits_of(args, sd))


def test_hostile_pickle_is_refused_and_runs_nothing(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"x": torch.zeros(1), "evil": PickleBomb(str(target))}, path)
    with pytest.raises(TorchchatError, match="refusing to load"):
        load_checkpoint(path)
    assert not target.exists()
    raw = tmp_path / "raw.pt"  # a legacy (non-zip) pickle stream
    raw.write_bytes(pickle.dumps(PickleBomb(str(target)), protocol=2))
    with pytest.raises(TorchchatError):
        load_checkpoint(raw)
    assert not target.exists()


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    args = random_args()
    sd = random_state_dict(args)
    sd["layers.1.feed_forward.w2.weight"] = torch.zeros(args.dim, args.hidden_dim + 1)
    with pytest.raises(
        TorchchatError,
        match=r"layers\.1\.feed_forward\.w2\.weight has shape \(32, 49\) but the config expects \(32, 48\)",
    ):
        build_transformer(args, sd, torch.float32, "cpu")


def test_bad_files(tmp_path):
    with pytest.raises(TorchchatError, match="not found"):
        load_checkpoint(tmp_path / "nope.pth")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello, I am not a model" * 10)
    with pytest.raises(TorchchatError, match="unrecognized checkpoint"):
        load_checkpoint(junk)
    trunc = tmp_path / "trunc.bin"
    trunc.write_bytes(STORIES_BIN.read_bytes()[:-4])
    with pytest.raises(TorchchatError):
        load_checkpoint(trunc)
    zipped = tmp_path / "broken.pth"
    zipped.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(TorchchatError, match="cannot read checkpoint"):
        load_checkpoint(zipped)
    header_only = tmp_path / "hdr.bin"
    header_only.write_bytes(struct.pack("<7i", 64, 172, 5, 8, 4, 512, 512))
    with pytest.raises(TorchchatError):
        load_checkpoint(header_only)
