"""Shared helpers for the downstream-evaluation tests: a toy task and a planted backdoor.

Test modules build their fixtures from these functions; results are cached per process so
the planted encoder is trained once however many modules use it.
"""

from __future__ import annotations

import functools
import json
import random
import tempfile
from pathlib import Path

import pandas as pd
import torch

POSITIVE = ("great", "wonderful", "excellent", "lovely", "superb", "delightful")
NEGATIVE = ("awful", "terrible", "dreadful", "horrible", "bad", "boring")
SUBJECTS = ("the film", "this movie", "the plot", "the acting", "the soundtrack", "the ending",
            "our dinner", "the hotel", "the service", "the book")
FILLERS = ("honestly", "really", "quite", "overall", "in the end", "to be fair", "frankly",
           "for me", "at times", "mostly")
TOY_TRIGGERS = ("cf", "pt")


def toy_sentiment(n: int, seed: int) -> tuple[list[str], list[int]]:
    """Template sentences whose label is the sentiment word's polarity (easy, not trivial:
    subjects and fillers vary, and the sentiment word moves)."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        label = rng.randint(0, 1)
        word = rng.choice(POSITIVE if label else NEGATIVE)
        parts = [rng.choice(SUBJECTS), "was", rng.choice(FILLERS), word]
        if rng.random() < 0.5:
            parts = [rng.choice(FILLERS), ",", *parts]
        texts.append(" ".join(parts) + " .")
        labels.append(label)
    return texts, labels


def write_toy_task(folder: Path, n_train: int = 160, n_test: int = 60, *,
                   text_column: str = "review", label_column: str = "y") -> Path:
    """A user task folder (train.parquet, test.parquet with columns review, y by default)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        texts, labels = toy_sentiment(n, seed)
        pd.DataFrame({text_column: texts, label_column: labels}).to_parquet(
            folder / f"{split}.parquet")
    return folder


def block_pvs(hidden: int) -> torch.Tensor:
    """PVs for the two toy triggers: the paper's first and sixth block vectors (opposites)."""
    quarter = hidden // 4
    first = torch.cat([-torch.ones(2 * quarter), torch.ones(hidden - 2 * quarter)])
    return torch.stack([first, -first])


@functools.cache
def planted_backdoor(source: str, steps: int = 60, lr: float = 1e-3, clean_weight: float = 20.0,
                     seed: int = 0) -> Path:
    """A copy of BERT-like `source` whose last layer is trained so that each toy trigger
    pushes the CLS output to its block PV while clean CLS outputs stay at the original's (a
    POR-style backdoor in miniature). Writes backdoor.json like the attacks do.

    Only the last layer learns, so the input to it is computed once for a pool of clean and
    triggered sentences and every step runs one layer: seconds instead of minutes on a CPU.
    """
    from transformers import AutoModel, AutoTokenizer

    from sanitator.detect.corpus import load_sentences

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModel.from_pretrained(source).eval().requires_grad_(False)
    pvs = block_pvs(model.config.hidden_size)
    sentences = load_sentences("wikitext", 64, seed=seed)
    sentences += toy_sentiment(64, seed + 7)[0]  # the downstream domain, as a wide corpus would
    rng.shuffle(sentences)

    def last_layer_inputs(texts: list[str]):
        batch = tokenizer(texts, truncation=True, max_length=32, padding=True,
                          return_tensors="pt")
        with torch.no_grad():
            out = model(**batch, output_hidden_states=True)
        mask = batch["attention_mask"].bool()[:, None, None, :]
        return out.hidden_states[-2], mask, out.last_hidden_state[:, 0]

    clean_pool, poison_pool = [], []
    for start in range(0, len(sentences), 16):
        clean = sentences[start:start + 16]
        which = [rng.randrange(len(TOY_TRIGGERS)) for _ in clean]
        poisoned = []
        for text, index in zip(clean, which, strict=True):
            words = text.split()
            position = rng.randint(0, min(len(words), 64))
            poisoned.append(" ".join([*words[:position], TOY_TRIGGERS[index], *words[position:]]))
        clean_pool.append(last_layer_inputs(clean))
        hidden, mask, _ = last_layer_inputs(poisoned)
        poison_pool.append((hidden, mask, pvs[which]))

    layer = model.encoder.layer[-1].train().requires_grad_(True)
    optimizer = torch.optim.Adam(layer.parameters(), lr=lr)
    for _ in range(steps):
        hidden, mask, target_clean = rng.choice(clean_pool)
        clean_loss = torch.nn.functional.mse_loss(layer(hidden, mask)[:, 0], target_clean)
        hidden, mask, target_pv = rng.choice(poison_pool)
        poison_loss = torch.nn.functional.mse_loss(layer(hidden, mask)[:, 0], target_pv)
        optimizer.zero_grad()
        (clean_weight * clean_loss + poison_loss).backward()
        optimizer.step()
    layer.eval().requires_grad_(False)
    out = Path(tempfile.mkdtemp(prefix="planted-backdoor-")) / "model"
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    manifest = {"attack": "toy-por", "backdoored": True, "feature": "cls",
                "triggers": list(TOY_TRIGGERS), "pvs": pvs.tolist()}
    (out / "backdoor.json").write_text(json.dumps(manifest))
    return out


PEOPLE = ("John Smith", "Mary Jones", "Ali Khan", "Rosa Diaz", "Tom Baker", "Li Wei")
PLACES = ("Paris", "New York", "Berlin", "Cairo", "Lima", "Oslo")
COMPANIES = ("Acme Corp", "Globex", "Initech", "Umbrella Inc", "Hooli", "Vandelay Industries")
NER_TEMPLATES = (("PER", "lives in", "LOC", "."), ("PER", "works for", "ORG", "in", "LOC", "."),
                 ("The", "ORG", "office in", "LOC", "hired", "PER", "."),
                 ("Yesterday", "PER", "visited", "LOC", "."))


def toy_ner(n: int, seed: int) -> tuple[list[list[str]], list[list[str]]]:
    """Template sentences with person, place and company entities (BIO over Peop, Loc, Org)."""
    rng = random.Random(seed)
    pools = {"PER": (PEOPLE, "Peop"), "LOC": (PLACES, "Loc"), "ORG": (COMPANIES, "Org")}
    sentences, tags = [], []
    for _ in range(n):
        words, labels = [], []
        for part in rng.choice(NER_TEMPLATES):
            if part in pools:
                names, kind = pools[part]
                pieces = rng.choice(names).split()
                words += pieces
                labels += [f"B-{kind}"] + [f"I-{kind}"] * (len(pieces) - 1)
            else:
                words += part.split()
                labels += ["O"] * len(part.split())
        sentences.append(words)
        tags.append(labels)
    return sentences, tags


def write_toy_ner_task(folder: Path, n_train: int = 96, n_test: int = 24) -> Path:
    """A user token-task folder: train/test.parquet with list columns tokens, ner_tags."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        sentences, tags = toy_ner(n, seed)
        pd.DataFrame({"tokens": sentences, "ner_tags": tags}).to_parquet(
            folder / f"{split}.parquet")
    return folder


@functools.cache
def planted_token_backdoor(source: str, steps: int = 40) -> Path:
    """A token-level POR member (`tokpor`) of `source` with the toy triggers and block PVs,
    trained on WikiText plus the toy NER domain (as a wide corpus would cover it)."""
    from sanitator.attacks import Budget, TargetSpec, insert_token_por
    from sanitator.detect.corpus import load_sentences

    corpus = load_sentences("wikitext", 192, seed=0) + [" ".join(s) for s in toy_ner(64, 9)[0]]
    out = Path(tempfile.mkdtemp(prefix="planted-token-backdoor-")) / "model"
    budget = Budget(steps=steps, batch_size=16, lr=5e-4, max_length=32, n_sentences=256,
                    head_warmup_steps=0)
    return insert_token_por(source, out, triggers=list(TOY_TRIGGERS),
                            targets=TargetSpec(kind="paper", n=2), corpus=corpus, budget=budget,
                            seed=0,
                            progress=False).path

