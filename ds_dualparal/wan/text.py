"""Prompt embeddings with Wan's UMT5 encoder, through diffusers' own `WanPipeline.encode_prompt`."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import torch

from ..config import TEXT_TOKENS
from ..pipeline.prompts import prompt_plan


_kept = None  # (signature, tokenizer): the tokenizer the model check read, for this process's encoding


def load_tokenizer(folder: Path, keep: bool = False):
    """The tokenizer in `folder`. The model check reads it before any weights load, and a first stage's
    encoding reads it again: `keep=True` holds this one for the next call on the same, unchanged folder,
    which takes it, so that a first stage reads it once (UMT5's is 16 MB of JSON, about a second)."""
    global _kept
    kept, _kept = _kept, None
    signature = _signature(Path(folder))
    if kept is not None and signature is not None and kept[0] == signature:
        tokenizer = kept[1]
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    if keep and signature is not None:
        _kept = (signature, tokenizer)
    return tokenizer


def _signature(folder: Path):
    """The folder and its files' names, sizes and modification times (a changed folder is read again);
    None where they cannot be read (then it is read again too)."""
    try:
        files = sorted((f.name, s.st_size, s.st_mtime_ns) for f in folder.iterdir() for s in [f.stat()])
        return str(folder.resolve()), tuple(files)
    except (OSError, ValueError):
        return None


def encode_prompts(
    model_path: Path, prompts: list[tuple[str, str, bool]], device, dtype: torch.dtype
) -> list[torch.Tensor]:
    """Embeddings of (prompt, negative prompt, cfg) triples, kept on the CPU until a job runs.

    Each is (2, TEXT_TOKENS, text_dim) [cond; uncond] with CFG, else (1, TEXT_TOKENS, text_dim). The
    encoder is loaded once for all of them and freed before denoising starts.
    """
    from diffusers import WanPipeline
    from transformers import UMT5EncoderModel

    tokenizer = load_tokenizer(model_path / "tokenizer")
    encoder = UMT5EncoderModel.from_pretrained(model_path / "text_encoder", dtype=dtype, use_safetensors=True).to(device)
    # Only the text half of the pipeline is built; encode_prompt touches nothing else.
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=None, scheduler=None)
    embeddings = []
    with torch.no_grad():
        for prompt, negative_prompt, cfg in prompts:
            cond, uncond = pipe.encode_prompt(
                prompt=prompt,
                negative_prompt=negative_prompt,
                do_classifier_free_guidance=cfg,
                max_sequence_length=TEXT_TOKENS,
                device=torch.device(device),
                dtype=dtype,
            )
            embeddings.append((torch.cat([cond, uncond]) if cfg else cond).cpu())
    alive = [weakref.ref(x) for x in (encoder, *encoder.parameters(), *encoder.buffers())]
    del pipe, encoder
    if any(ref() is not None for ref in alive):  # held by a reference cycle: a full collection frees it
        gc.collect()  # (~0.25 s over a heap holding torch, diffusers and transformers, so only when needed)
    del alive
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return embeddings


def encode_jobs(model_path: Path, cfgs: list, device, dtype: torch.dtype) -> list[torch.Tensor]:
    """Per job, the embeddings of its prompt plan's distinct texts stacked in the plan's order:
    (num_texts, batch, TEXT_TOKENS, text_dim). Every distinct (prompt, negative prompt, cfg) of all
    the jobs is encoded once, with one encoder load."""
    jobs = [[(*text, cfg.do_classifier_free_guidance) for text in prompt_plan(cfg).texts] for cfg in cfgs]
    distinct = list(dict.fromkeys(triple for job in jobs for triple in job))
    embeddings = dict(zip(distinct, encode_prompts(model_path, distinct, device, dtype)))
    return [torch.stack([embeddings[triple] for triple in job]) for job in jobs]
