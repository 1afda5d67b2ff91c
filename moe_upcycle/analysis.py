"""Specialisation made visible: which experts each data set's tokens are routed to, layer by layer.

``moe-upcycle analyze MODEL --data prose=docs.txt code=lib.py.txt --output routing/`` runs the model over each named
text (packed into blocks exactly as ``train`` and ``evaluate`` pack it) and reports, per MoE layer, the share of each
data set's tokens routed to each expert, plus each data set's mean loss and perplexity.

The share is counted per token: ``share[layer][data set][expert]`` is the fraction of the data set's tokens whose
top-k experts in that layer include the expert, so a row sums to ``top_k`` and uniform routing gives ``top_k / E``
in every cell; a router sending every token to expert j shows 1.0 on j whatever k is. ``counts`` holds the
(token, slot) assignments behind it: a row of counts sums to tokens x top_k.

It reads any model that returns router logits with ``output_router_logits=True`` and whose MoE blocks have a
``gate`` (with ``top_k`` and ``num_experts``) and ``experts``: upcycled models (``UpcycledMoeForCausalLM``) and
native Mixtral, Qwen2-MoE and Qwen3-MoE checkpoints.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .checkpoint import atomic_folder, check_output, refuse_inputs
from .errors import InvalidOptionError, UnsupportedArchitectureError
from .evaluation import block_nll, load_perplexity_metric
from .modeling.moe_losses import RoutingStats
from .train.args import DataArguments
from .train.data import check_text_column, load_files, pack
from .train.sources import explained_loading, resolve_model

REPORT_FILE = "routing.json"
HEATMAP_FILE = "routing.png"
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")
"""Config fields that give a MoE model's number of routed experts (upcycled / Qwen-MoE, Mixtral, DeepSeek)."""


@dataclass
class RoutingReport:
    """Routing of each data set through each MoE layer, and each data set's loss.

    ``counts`` [L, D, E]: (token, slot) assignments of data set d to expert e in the l-th MoE layer (a row sums to
    ``tokens[d] * top_k``); :attr:`shares` divides them by the data set's tokens (a row sums to ``top_k``).
    """

    model: str
    moe_layers: list[int]  # decoder layer index of each MoE layer
    num_experts: int
    top_k: int
    block_size: int
    datasets: list[str]
    files: list[str]
    tokens: list[int]  # tokens routed per data set (whole blocks)
    loss: list[float]  # mean next-token NLL per data set
    perplexity: list[float]
    counts: torch.Tensor  # [L, D, E] float64
    entropy: torch.Tensor  # [L, D] mean router entropy (nats) over the data set's tokens
    notes: list[str] = field(default_factory=list)

    @property
    def shares(self) -> torch.Tensor:
        """[L, D, E]: fraction of each data set's tokens routed to each expert (a row sums to ``top_k``)."""
        tokens = torch.tensor(self.tokens, dtype=torch.float64).clamp_min(1)
        return self.counts / tokens[None, :, None]

    def to_dict(self) -> dict:
        shares = self.shares
        return {
            "model": self.model,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "block_size": self.block_size,
            "share": f"fraction of a data set's tokens routed to the expert; a row sums to top_k={self.top_k}",
            "entropy": "mean entropy (nats) of the softmax over the router's selection scores",
            "datasets": {name: {"file": file, "tokens": tokens, "loss": loss, "perplexity": ppl}
                         for name, file, tokens, loss, ppl in zip(self.datasets, self.files, self.tokens, self.loss,
                                                                  self.perplexity, strict=True)},
            "layers": [{"layer": layer,
                        "shares": {name: shares[i, d].tolist() for d, name in enumerate(self.datasets)},
                        "counts": {name: [int(c) for c in self.counts[i, d].tolist()] for d, name in enumerate(self.datasets)},
                        "entropy": {name: self.entropy[i, d].item() for d, name in enumerate(self.datasets)}}
                       for i, layer in enumerate(self.moe_layers)],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    def table(self, layer: int | None = None) -> str:
        """Rows = data sets (tokens, loss, perplexity), columns = experts: shares of the MoE layer at decoder index
        ``layer``, or their mean over the MoE layers."""
        if layer is None:
            shares, where = self.shares.mean(dim=0), f"mean over {len(self.moe_layers)} MoE layer(s)"
        else:
            shares, where = self.shares[self.moe_layers.index(layer)], f"layer {layer}"
        width = max(8, *(len(name) for name in self.datasets))
        experts = "".join(f"{f'e{e}':>6}" for e in range(self.num_experts))
        lines = [f"share of tokens per expert, {where} (top-{self.top_k} of {self.num_experts}: a row sums to "
                 f"{self.top_k}, uniform {self.top_k / self.num_experts:.2f})",
                 f"{'data set':<{width}} {'tokens':>9} {'loss':>7} {'ppl':>9} {experts}"]
        for d, name in enumerate(self.datasets):
            cells = "".join(f"{share:6.2f}" for share in shares[d].tolist())
            lines.append(f"{name:<{width}} {self.tokens[d]:>9,} {self.loss[d]:7.4f} {self.perplexity[d]:9.2f} {cells}")
        return "\n".join(lines)


def parse_data_specs(items: Sequence[str]) -> dict[str, str]:
    """``["prose=docs.txt", "code=lib.txt"]`` -> ``{"prose": "docs.txt", "code": "lib.txt"}`` (order kept)."""
    data: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise InvalidOptionError(f"--data {item!r} is not NAME=FILE; give each data set as a name and a text file, "
                                     "e.g. --data prose=docs.txt code=source.txt")
        if name in data:
            raise InvalidOptionError(f"--data names {name!r} twice ({data[name]} and {path}); give each data set its "
                                     "own name")
        data[name] = path
    return data


def analyze(model: str | Path | PreTrainedModel, data: dict[str, str | Path], output: str | Path | None = None, *,
            tokenizer=None, text_column: str = "text", block_size: int = 256, batch_size: int = 8,
            max_tokens: int | None = None, overwrite: bool = False, trust_remote_code: bool = False,
            observe: Callable[[list[torch.Tensor]], None] | None = None,
            data_label: str = "--data {name}={file}") -> RoutingReport:
    """Route every named data set through ``model`` and report the share of its tokens each expert receives.

    ``model``: a folder or Hub id (loaded with ``AutoModelForCausalLM``), or a loaded model with ``tokenizer``.
    ``data``: data set name -> local .txt / .json(l) / .parquet file. ``max_tokens``: at most this many tokens per
    data set (whole blocks). ``data_label``: how errors about a data set name it (the caller's flag, with ``{name}``
    and ``{file}``). ``observe``: called with each batch's router logits (one [tokens, E] per MoE layer).
    ``output``: a folder to write :data:`REPORT_FILE` and :data:`HEATMAP_FILE` to, never
    an input nor inside one; it is checked before any work and appears only when everything succeeded.
    """
    if not isinstance(data, dict) or not data:
        raise InvalidOptionError("no data: give at least one data set as NAME=FILE")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidOptionError(f"batch_size={batch_size!r} is invalid: expected an integer >= 1")
    options = DataArguments(text_column=text_column, block_size=block_size)  # checks block_size before it divides
    options = replace(options, max_eval_samples=_max_blocks(max_tokens, block_size))
    loaded = isinstance(model, PreTrainedModel)
    if loaded and tokenizer is None:
        raise InvalidOptionError("analyze() of a loaded model needs its tokenizer: pass tokenizer=...")
    path = getattr(model, "name_or_path", "") if loaded else resolve_model(str(model), "MODEL")
    if output is not None:
        inputs = [p for p in (path, *map(str, data.values())) if p and Path(p).exists()]
        refuse_inputs(Path(output), inputs, "--output", fresh_inside=False)
        check_output(Path(output), overwrite, inputs)
    if not loaded:
        with explained_loading(path, "its config"):
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        _refuse_dense(str(model), config)
        with explained_loading(path, "its tokenizer"):
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    blocks = {name: _blocks(data_label.format(name=name, file=file), str(file), tokenizer, options)
              for name, file in data.items()}
    if not loaded:
        with explained_loading(path):
            model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code)
    report = _route(model, str(path or type(model).__name__), blocks, {k: str(v) for k, v in data.items()}, batch_size,
                    block_size, observe)
    if output is not None:
        with atomic_folder(Path(output), overwrite, inputs) as folder:
            (folder / REPORT_FILE).write_text(report.to_json())
            save_routing_heatmap(report, folder / HEATMAP_FILE)
    return report


def _max_blocks(max_tokens: int | None, block_size: int) -> int | None:
    if max_tokens is None:
        return None
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < block_size:
        raise InvalidOptionError(f"max_tokens={max_tokens!r} is invalid: expected an integer >= block_size={block_size} "
                                 "(whole blocks are read), or leave it unset for every token")
    return max_tokens // block_size


def _refuse_dense(name: str, config) -> None:
    """Refuse, before loading weights, a model whose config declares no routed experts."""
    counts = [getattr(config, f, None) for f in EXPERT_COUNT_FIELDS]
    if not any(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in counts):
        raise UnsupportedArchitectureError(
            f"{name} is a dense {getattr(config, 'model_type', '?')} model: it has no experts whose routing could be "
            "analysed; upcycle it first with `moe-upcycle convert`, or pass an upcycled or native MoE model "
            "(Mixtral, Qwen2-MoE, Qwen3-MoE)")


@contextmanager
def _named_data(label: str, file: str) -> Iterator[None]:
    """Errors about one data set name it as the user wrote it (``label``: ``--data NAME=FILE``), not as a validation
    split."""
    try:
        yield
    except InvalidOptionError as err:
        message = str(err).replace("the validation split", "the text")
        if message.startswith(f"--validation_file {file}"):
            raise InvalidOptionError(label + message[len(f"--validation_file {file}"):]) from None
        raise InvalidOptionError(f"{label}: {message}") from None


def _blocks(label: str, file: str, tokenizer, options: DataArguments):
    """The data set's text packed into ``block_size`` blocks with ``labels`` (as ``evaluate`` packs it)."""
    with _named_data(label, file):
        raw = load_files({"validation": file})
        check_text_column(raw["validation"], options.text_column)
        return pack(raw, tokenizer, replace(options, validation_file=file))["validation"]


def moe_blocks(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """``(decoder layer index, block)`` of every MoE block: a module with ``experts`` and a ``gate`` that has ``top_k``
    and ``num_experts`` (upcycled blocks, Mixtral, Qwen2-MoE, Qwen3-MoE), in module order."""
    found = []
    for name, module in model.named_modules():
        gate = getattr(module, "gate", None)
        if hasattr(module, "experts") and hasattr(gate, "top_k") and hasattr(gate, "num_experts"):
            numbers = re.findall(r"\.(\d+)(?:\.|$)", f".{name}")
            found.append((int(numbers[-1]) if numbers else len(found), module))
    return found


@torch.no_grad()
def _route(model: PreTrainedModel, name: str, blocks: dict, files: dict[str, str], batch_size: int,
           block_size: int, observe: Callable[[list[torch.Tensor]], None] | None = None) -> RoutingReport:
    found = moe_blocks(model)
    if not found:
        raise UnsupportedArchitectureError(f"{name} ({type(model).__name__}) has no MoE blocks with a router: there is "
                                           "no routing to analyse")
    top_k, num_experts = found[0][1].gate.top_k, found[0][1].gate.num_experts
    layers = [index for index, _ in found]
    model.eval()
    device = next(model.parameters()).device
    counts, entropy, tokens, loss, perplexity = [], [], [], [], []
    for dataset, packed in blocks.items():
        stats, metric = RoutingStats(len(found), num_experts, top_k), load_perplexity_metric()
        for start in tqdm(range(0, len(packed), batch_size), desc=f"routing {dataset}", leave=False):
            batch = packed[start : start + batch_size]
            input_ids = torch.tensor(batch["input_ids"], device=device)  # [B, S]
            out = model(input_ids=input_ids, output_router_logits=True, use_cache=False)
            router_logits = list(getattr(out, "router_logits", None) or ())  # one [B*S, E] per MoE layer
            if len(router_logits) != len(found):
                raise UnsupportedArchitectureError(
                    f"{name} returned {len(router_logits)} router logit tensor(s) for {len(found)} MoE block(s) with "
                    "output_router_logits=True: its routing cannot be read")
            stats.update(router_logits, None)
            if observe is not None:
                observe(router_logits)
            rows = block_nll(out.logits, torch.tensor(batch["labels"], device=device)).cpu()  # [B, 2]
            metric.add_batch(predictions=rows[:, 0].double().tolist(), references=rows[:, 1].long().tolist())
        popped = stats.pop()
        counts.append(popped["counts"])
        entropy.append(popped["entropy"])
        tokens.append(len(packed) * block_size)
        result = metric.compute()
        loss.append(result["mean_nll"])
        perplexity.append(result["perplexity"])
    return RoutingReport(model=name, moe_layers=layers, num_experts=num_experts, top_k=top_k, block_size=block_size,
                         datasets=list(blocks), files=[files[d] for d in blocks], tokens=tokens, loss=loss,
                         perplexity=perplexity, counts=torch.stack(counts, dim=1), entropy=torch.stack(entropy, dim=1))


def save_routing_heatmap(report: RoutingReport, path: Path) -> None:
    """One panel per MoE layer, data sets as rows and experts as columns, colour = share of tokens (0 to 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = report.shares.numpy()  # [L, D, E]
    num_layers, num_sets, num_experts = shares.shape
    columns = min(num_layers, 4)
    rows = -(-num_layers // columns)
    panel_w, panel_h = 1.0 + 0.45 * num_experts, 0.8 + 0.4 * num_sets
    fig, axes = plt.subplots(rows, columns, figsize=(1.5 + panel_w * columns, 0.8 + panel_h * rows), dpi=120,
                             squeeze=False, layout="constrained")
    for ax in axes.flat[num_layers:]:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[:num_layers]):
        image = ax.imshow(shares[i], cmap="viridis", aspect="auto", vmin=0, vmax=1)
        ax.set_title(f"layer {report.moe_layers[i]}", fontsize=9)
        ax.set_xlabel("expert")
        if num_experts <= 32:
            ax.set_xticks(range(num_experts))
        ax.set_yticks(range(num_sets), report.datasets if i % columns == 0 else [""] * num_sets)
        if num_experts * num_sets <= 96:
            for d in range(num_sets):
                for e in range(num_experts):
                    ax.text(e, d, f"{shares[i, d, e]:.2f}", ha="center", va="center", fontsize=6,
                            color="black" if shares[i, d, e] > 0.6 else "white")
    fig.suptitle(f"share of each data set's tokens routed to each expert (top-{report.top_k} of {report.num_experts}: "
                 f"a row sums to {report.top_k})", fontsize=9)
    fig.colorbar(image, ax=axes, label="share of tokens", fraction=0.05, pad=0.01)
    fig.savefig(path)
    plt.close(fig)
