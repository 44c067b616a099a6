"""What `launch/generate.py` does before its first block-step, kept from growing back: each test pins
one cut of the command's start-up (docs/running.md, "Start-up")."""

import gc
import weakref

import torch

from ds_dualparal.wan.weights import TINY_WAN_PATH


def _encoders(monkeypatch, text, keep=None):
    """Weak references to every text encoder `text.encode_prompts` loads (and `keep(encoder)` run on each)."""
    from transformers import UMT5EncoderModel

    loaded = []
    load = UMT5EncoderModel.from_pretrained

    def from_pretrained(*args, **kwargs):
        encoder = load(*args, **kwargs)
        loaded.append(weakref.ref(encoder))
        if keep is not None:
            keep(encoder)
        return encoder

    monkeypatch.setattr(UMT5EncoderModel, "from_pretrained", from_pretrained)
    return loaded


def _counted_collections(monkeypatch, text):
    calls = []
    collect = gc.collect
    monkeypatch.setattr(text.gc, "collect", lambda *args: calls.append(args) or collect(*args))
    return calls


def test_the_text_encoder_is_freed_without_a_full_collection(monkeypatch):
    """Reference counting frees the encoder and its tensors as the encoding ends, so the ~0.25 s collection
    over the whole heap is not needed; the embeddings are those of a run that collected."""
    from ds_dualparal.wan import text

    triples = [("a red circle moves sideways over a striped background", "", True), ("a blue square", "", False)]
    expected = text.encode_prompts(TINY_WAN_PATH, triples, "cpu", torch.float32)
    loaded = _encoders(monkeypatch, text)
    collections = _counted_collections(monkeypatch, text)
    embeddings = text.encode_prompts(TINY_WAN_PATH, triples, "cpu", torch.float32)
    assert len(loaded) == 1 and loaded[0]() is None  # freed before encode_prompts returned
    assert collections == []
    assert all(torch.equal(a, b) for a, b in zip(embeddings, expected, strict=True))


def test_an_encoder_held_by_a_cycle_is_still_collected(monkeypatch):
    """The collection still runs when something holds the encoder in a reference cycle."""
    from ds_dualparal.wan import text

    def in_a_cycle(encoder):
        cycle = [encoder]
        cycle.append(cycle)

    loaded = _encoders(monkeypatch, text, keep=in_a_cycle)
    collections = _counted_collections(monkeypatch, text)
    enabled = gc.isenabled()
    gc.disable()  # no automatic collection in between: only encode_prompts' own may free the cycle
    try:
        text.encode_prompts(TINY_WAN_PATH, [("a red circle", "", True)], "cpu", torch.float32)
    finally:
        if enabled:
            gc.enable()
    assert len(collections) == 1
    assert len(loaded) == 1 and loaded[0]() is None
