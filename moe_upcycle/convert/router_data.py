"""Router initialisation from data: one router row per expert from example prompts.

Upcycling (Komatsuzaki et al., "Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints",
ICLR 2023, arXiv 2212.05055) copies the dense MLP into every expert and starts the router from random
weights. When the experts are meant to specialise (code, maths, prose, ...), the router can instead start
from what the dense model already "thinks" on example text of each speciality, as mergekit-moe does
(https://github.com/arcee-ai/mergekit/blob/main/docs/moe.md, ``gate_mode``):

- ``hidden`` (:func:`hidden_router_rows`): run the dense model on each expert's prompts and use the hidden
  states the router will see (here: exactly the MLP input of each MoE layer, captured with forward
  pre-hooks) averaged over the prompt tokens; negative prompts are subtracted.
- ``cheap_embed`` (:func:`embedding_router_rows`): no forward pass; use the mean input embedding of the
  prompt tokens, the same row for every layer. mergekit calls it "distinctly less effective than hidden".

The prompts come from a YAML file (:func:`load_router_prompts`, example: configs/router_prompts_example.yaml)::

    experts:
      - positive_prompts: ["def f(x):", ...]
        negative_prompts: ["Once upon a time", ...]   # optional
      - positive_prompts: [...]

Differences from mergekit, each chosen to make a better router of *this* package's layout (router logits =
float32 MLP input @ ``mlp.gate.weight``.T, softmax, renormalised top-k):

1. mergekit averages the residual stream entering the decoder layer (``output_hidden_states``); the router
   here reads the MLP input (after the attention block and, in pre-norm models, the post-attention norm),
   so that is what is averaged. Special tokens (BOS/CLS/SEP...) are left out of the averages: they are the
   same in every prompt, carry no information about the speciality, and BOS often has outlier activations.
2. Order of centring and normalisation. Softmax (and top-k) is invariant to adding one vector ``c`` to every
   row, since every logit of a token moves by the same ``x . c``. So subtracting the mean row is free *after*
   L2 normalisation: it keeps mergekit's routing (cosine similarity to each expert's mean direction) and
   only removes the logit offset shared by all experts, which keeps raw logits, and the router z-loss,
   small. Centring *before* normalisation is not invariant (it changes the rows' relative lengths); on the
   test suite's held-out text it made routing much less even (with the trained MiniLM, code tokens sent to
   the code expert fell from 0.74-0.85 to 0.28-0.64 per layer while prose and maths gained a little), so it
   is not done. With negative prompts the difference of means already removes the shared component.
3. mergekit stops at unit rows, so its logits are ``|x| cos(x, row)``, as large as the hidden-state norm
   (for real models often tens or more: a nearly one-hot, saturated softmax). Here the unit rows are scaled
   by one number per layer so that on the prompt tokens themselves the logits' standard deviation across
   experts (per token, root mean square over tokens) is ``logit_std`` (default 2.0). Measured in the tests
   (trained MiniLM, 3 experts, held-out text): spread 2.0, mean top-1 probability 0.72, largest |logit| 5.5
   -- confident but far from saturated, so the router still gets gradients and the router z-loss stays
   small. The scale is calibrated on (at most ``max_calibration_tokens`` per layer of) the prompt tokens.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import InvalidOptionError
from ..yaml_config import read_yaml

if TYPE_CHECKING:
    from .options import UpcycleOptions

logger = logging.getLogger(__name__)

DEFAULT_LOGIT_STD = 2.0
DEFAULT_MAX_CALIBRATION_TOKENS = 1024

_EXPERT_KEYS = {"positive_prompts", "negative_prompts"}


@dataclass(frozen=True)
class ExpertPrompts:
    """Example prompts of one expert: text it should get (positive) and, optionally, text it should not."""

    positive: tuple[str, ...]
    negative: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------- YAML


def _prompt_list(path: Path, index: int, key: str, value: object, *, required: bool) -> tuple[str, ...]:
    where = f"{path}: experts[{index}].{key}"
    if value is None:
        if required:
            raise InvalidOptionError(f"{where} is missing or empty; give each expert at least one positive prompt.")
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise InvalidOptionError(f"{where} must be a list of strings, got {type(value).__name__}.")
    for position, prompt in enumerate(value):
        if not isinstance(prompt, str):
            raise InvalidOptionError(
                f"{where}[{position}] must be a string, got {type(prompt).__name__} ({prompt!r}); quote it in the YAML."
            )
        if not prompt.strip():
            raise InvalidOptionError(f"{where}[{position}] is an empty string; remove it or write a prompt.")
    if required and not value:
        raise InvalidOptionError(f"{where} is empty; give each expert at least one positive prompt.")
    return tuple(value)


def load_router_prompts(path: str | Path) -> list[ExpertPrompts]:
    """Read a router-prompts YAML file: ``experts:`` a list with one entry per expert, in expert order.

    Each entry is a mapping with ``positive_prompts`` (a non-empty list of strings) and optionally
    ``negative_prompts``; a single string is accepted for either. Raises :class:`InvalidOptionError` naming
    the file and the problem for a missing/unreadable file, bad YAML, a document that is not a mapping with
    an ``experts`` list, an entry without positive prompts, non-string or empty prompts, and unknown keys.
    """
    path = Path(path)
    document = read_yaml(path, "router prompts file")
    if not isinstance(document, dict) or "experts" not in document:
        got = "an empty file" if document is None else f"a {type(document).__name__}"
        if isinstance(document, dict):
            got = f"a mapping with keys {sorted(map(str, document))}"
        raise InvalidOptionError(
            f"Router prompts file {path} must be a mapping with an 'experts' list "
            f"(experts: [{{positive_prompts: [...]}}, ...]); got {got}."
        )
    unknown_top = sorted(map(str, set(document) - {"experts"}))
    if unknown_top:
        raise InvalidOptionError(f"Router prompts file {path} has unknown top-level keys {unknown_top}; only 'experts' is allowed.")
    experts = document["experts"]
    if not isinstance(experts, list) or not experts:
        raise InvalidOptionError(f"{path}: 'experts' must be a non-empty list with one entry per expert, got {experts!r:.80}.")
    result = []
    for index, entry in enumerate(experts):
        if not isinstance(entry, dict):
            raise InvalidOptionError(
                f"{path}: experts[{index}] must be a mapping with 'positive_prompts' (and optionally "
                f"'negative_prompts'), got {type(entry).__name__}."
            )
        unknown = sorted(map(str, set(entry) - _EXPERT_KEYS))
        if unknown:
            raise InvalidOptionError(
                f"{path}: experts[{index}] has unknown keys {unknown}; allowed: {sorted(_EXPERT_KEYS)}."
            )
        positive = _prompt_list(path, index, "positive_prompts", entry.get("positive_prompts"), required=True)
        negative = _prompt_list(path, index, "negative_prompts", entry.get("negative_prompts"), required=False)
        result.append(ExpertPrompts(positive=positive, negative=negative))
    return result


# --------------------------------------------------------------------------------------------- rows


def _check_prompts(prompts: Sequence[ExpertPrompts], num_experts: int) -> None:
    if num_experts < 2:
        raise InvalidOptionError(f"Router rows from prompts need num_experts >= 2, got {num_experts}.")
    if len(prompts) != num_experts:
        raise InvalidOptionError(
            f"Router prompts give {len(prompts)} experts but the model gets num_experts={num_experts}; "
            "write one 'experts' entry per expert."
        )
    for index, expert in enumerate(prompts):
        if not expert.positive:
            raise InvalidOptionError(f"Router prompts: expert {index} has no positive prompts.")


def _no_tokens(index: int, kind: str, prompt: str) -> InvalidOptionError:
    return InvalidOptionError(
        f"Router prompts: {kind} prompt {prompt!r:.60} of expert {index} tokenises to zero (non-special) tokens; "
        "use a longer prompt."
    )


def _content_ids(tokenizer, prompt: str, *, add_special_tokens: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [T], content mask [T] bool: True for tokens that are not special tokens)."""
    encoded = tokenizer(prompt, add_special_tokens=add_special_tokens, return_special_tokens_mask=True)
    ids = torch.as_tensor(encoded["input_ids"], dtype=torch.long).reshape(-1)
    special = encoded.get("special_tokens_mask")
    if special is None:
        special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        mask = torch.tensor([int(i) not in special_ids for i in ids.tolist()], dtype=torch.bool)
    else:
        mask = ~torch.as_tensor(special, dtype=torch.bool).reshape(-1)
    return ids, mask


def finish_rows(
    means: torch.Tensor, calibration: torch.Tensor, *, logit_std: float = DEFAULT_LOGIT_STD, center: bool = True
) -> torch.Tensor:
    """Turn per-expert mean vectors [E, H] into router rows [E, H] (float32).

    L2-normalise each row (routing by cosine similarity to the experts' mean directions), subtract the mean
    row (``center``; changes no routing decision, only removes the logit offset common to all experts), then
    scale all rows by one factor so that the logits of the ``calibration`` vectors [N, H] have a standard
    deviation across experts (per vector, root mean square over vectors) of ``logit_std``. See the module
    docstring for the reasons.
    """
    if not logit_std > 0:
        raise InvalidOptionError(f"logit_std must be > 0, got {logit_std}.")
    rows = means.double()
    norms = rows.norm(dim=-1, keepdim=True)
    zero = (norms.squeeze(-1) <= 1e-12).nonzero().flatten().tolist()
    if zero:
        raise InvalidOptionError(
            f"Router prompts: experts {zero} get a zero row (their positive and negative prompts give the same mean "
            "hidden state); give them different prompts."
        )
    rows = rows / norms
    cosine = rows @ rows.T - 2 * torch.eye(len(rows), dtype=rows.dtype)
    if float(cosine.max()) > 0.99:
        i, j = divmod(int(cosine.argmax()), len(rows))
        logger.warning(
            "Router rows of experts %d and %d are nearly parallel (cosine %.4f): their prompts are too similar, "
            "and the router will hardly tell them apart.", i, j, float(cosine.max())
        )
    if center:
        rows = rows - rows.mean(dim=0, keepdim=True)
    logits = calibration.double() @ rows.T  # [N, E]
    spread = float(logits.std(dim=-1, unbiased=False).pow(2).mean().sqrt())
    if not math.isfinite(spread) or spread <= 1e-12:
        raise InvalidOptionError(
            "Router prompts: the experts' rows give every token the same logits (identical prompts?); "
            "give the experts different prompts."
        )
    return (rows * (logit_std / spread)).float()


def _calibration_indices(count: int, budget: int) -> torch.Tensor:
    """At most ``budget`` evenly spaced positions of ``range(count)`` (all of them when they fit)."""
    if count <= budget:
        return torch.arange(count)
    return torch.linspace(0, count - 1, budget).round().long().unique()


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise RuntimeError("the MLP module was called without a tensor argument")


def _rows_from_vectors(
    prompts: Sequence[ExpertPrompts],
    num_experts: int,
    encode: Callable[[str], tuple[torch.Tensor, torch.Tensor]],
    vectors: Callable[[torch.Tensor, torch.Tensor], dict[int, torch.Tensor]],
    *,
    calibration_dtype: torch.dtype,
    logit_std: float,
    center: bool,
    max_calibration_tokens: int,
    show_progress: bool,
) -> dict[int, torch.Tensor]:
    """The recipe both modes share: ``row_e = mean(vectors of e's positive prompts) - mean(of its negatives)``,
    then :func:`finish_rows`, per key (MoE layer) of what ``vectors`` returns.

    ``encode(prompt)`` -> (input ids [T], content mask [T]); every prompt is encoded (and refused when it has no
    content token) before any vector is computed. ``vectors(ids, mask)`` -> {key: content vectors [T_content, H]}.
    At most ``max_calibration_tokens`` vectors per key, evenly spaced within each prompt, are kept (as
    ``calibration_dtype``) to calibrate the logit spread.
    """
    _check_prompts(prompts, num_experts)
    encoded = []
    for index, expert in enumerate(prompts):
        for slot, (kind, group) in enumerate((("positive", expert.positive), ("negative", expert.negative))):
            for prompt in group:
                ids, mask = encode(prompt)
                if not bool(mask.any()):
                    raise _no_tokens(index, kind, prompt)
                encoded.append((index, slot, ids, mask))
    per_prompt_budget = max(1, max_calibration_tokens // len(encoded))
    sums: dict[int, torch.Tensor] = {}  # key -> [E, 2, H] float64 (positive, negative)
    counts = torch.zeros(num_experts, 2, dtype=torch.float64)
    calibration: dict[int, list[torch.Tensor]] = {}
    for index, slot, ids, mask in tqdm(encoded, desc="router prompts", unit="prompt", disable=not show_progress):
        for key, content in vectors(ids, mask).items():
            if key not in sums:
                sums[key] = torch.zeros(num_experts, 2, content.shape[-1], dtype=torch.float64)
                calibration[key] = []
            sums[key][index, slot] += content.double().sum(dim=0)
            calibration[key].append(content[_calibration_indices(len(content), per_prompt_budget)].to(calibration_dtype))
        counts[index, slot] += int(mask.sum())
    return {key: finish_rows(_expert_means(sums[key], counts), torch.cat(calibration[key]).float(),
                             logit_std=logit_std, center=center) for key in sums}


def hidden_router_rows(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[ExpertPrompts],
    layers: Iterable[int],
    mlp_modules: Mapping[int, nn.Module],
    *,
    num_experts: int,
    logit_std: float = DEFAULT_LOGIT_STD,
    center: bool = True,
    max_calibration_tokens: int = DEFAULT_MAX_CALIBRATION_TOKENS,
    show_progress: bool = True,
) -> dict[int, torch.Tensor]:
    """mergekit's ``gate_mode: hidden``: router rows [E, H] float32 for each of ``layers`` from the dense model.

    ``model`` is the dense ``*ForCausalLM`` (float32, eval mode; it is not modified), ``mlp_modules[layer]``
    the dense MLP module of each layer in ``layers``. A forward pre-hook on each MLP captures its input --
    exactly what the MoE router of that layer will read. Each prompt is run on its own (batch of one, no
    padding) with the tokenizer's special tokens, which are then left out of the averages.

    For expert ``e``: ``row_e = mean(MLP inputs over all tokens of all positive prompts)`` minus the same mean
    over the negative prompts when there are any; then :func:`finish_rows`: L2-normalise, subtract the mean row
    (``center``; no routing change), and scale so the logits' spread across experts on the prompt tokens is ``logit_std``
    (calibrated on at most ``max_calibration_tokens`` tokens per layer, evenly spaced within each prompt).

    Raises :class:`InvalidOptionError` when ``len(prompts) != num_experts``, a prompt has no non-special
    token, or rows are degenerate (identical experts).
    """
    _check_prompts(prompts, num_experts)
    layers = list(dict.fromkeys(int(layer) for layer in layers))
    missing = [layer for layer in layers if layer not in mlp_modules]
    if missing:
        raise InvalidOptionError(f"hidden_router_rows: no MLP module given for layers {missing}.")
    if not layers:
        return {}
    device = getattr(model, "device", None) or next(model.parameters()).device
    backbone = getattr(model, "base_model", None)  # the decoder without the LM head: no [T, vocab] logits to compute
    if not isinstance(backbone, nn.Module):
        backbone = model
    if model.training:
        logger.warning("hidden_router_rows: the model is in training mode (dropout is active); call model.eval() first.")
    captured: dict[int, torch.Tensor] = {}

    def make_hook(layer: int):
        def hook(_module, args, kwargs):
            captured[layer] = _first_tensor(args, kwargs).detach()

        return hook

    def mlp_inputs(ids: torch.Tensor, mask: torch.Tensor) -> dict[int, torch.Tensor]:
        captured.clear()
        with torch.no_grad():
            backbone(input_ids=ids[None].to(device), attention_mask=torch.ones_like(ids)[None].to(device), use_cache=False)
        result = {}
        for layer in layers:
            if layer not in captured:
                raise RuntimeError(f"hidden_router_rows: the MLP module of layer {layer} was not called by model.forward.")
            hidden = captured[layer].float().cpu()
            hidden = hidden.reshape(-1, hidden.shape[-1])
            if hidden.shape[0] != len(ids):
                raise RuntimeError(
                    f"hidden_router_rows: the MLP of layer {layer} got {hidden.shape[0]} token vectors for a "
                    f"{len(ids)}-token prompt; cannot match them to tokens."
                )
            result[layer] = hidden[mask]
        return result

    handles = [mlp_modules[layer].register_forward_pre_hook(make_hook(layer), with_kwargs=True) for layer in layers]
    try:
        return _rows_from_vectors(
            prompts, num_experts, lambda prompt: _content_ids(tokenizer, prompt, add_special_tokens=True), mlp_inputs,
            calibration_dtype=torch.bfloat16, logit_std=logit_std, center=center,
            max_calibration_tokens=max_calibration_tokens, show_progress=show_progress)
    finally:
        for handle in handles:
            handle.remove()


def _expert_means(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """sums [E, 2, H], counts [E, 2] (positive, negative) -> mean_pos - mean_neg (mean_pos without negatives)."""
    positive = sums[:, 0] / counts[:, 0, None]
    negative = torch.where(counts[:, 1, None] > 0, sums[:, 1] / counts[:, 1, None].clamp(min=1), torch.zeros_like(positive))
    return positive - negative


def _rms_normalise(vectors: torch.Tensor) -> torch.Tensor:
    return vectors / vectors.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp(min=1e-12)


def embedding_router_rows(
    embedding_weight: torch.Tensor,
    tokenizer,
    prompts: Sequence[ExpertPrompts],
    layers: Iterable[int],
    *,
    num_experts: int,
    logit_std: float = DEFAULT_LOGIT_STD,
    center: bool = True,
    max_calibration_tokens: int = DEFAULT_MAX_CALIBRATION_TOKENS,
    show_progress: bool = True,
) -> dict[int, torch.Tensor]:
    """mergekit's ``gate_mode: cheap_embed``: rows [E, H] float32 from input embeddings, the same for every layer.

    No forward pass: ``embedding_weight`` [V, H] is the dense model's input embedding matrix. Prompts are
    tokenised without special tokens; each token's embedding is RMS-normalised (a stand-in for the pre-MLP
    norm of pre-norm models, which makes the router input's per-element RMS about the norm weight), then
    ``row_e = mean_pos - mean_neg`` and :func:`finish_rows` as in :func:`hidden_router_rows`, calibrated on
    the normalised prompt embeddings. Every layer in ``layers`` gets its own copy of the same rows.

    Caveat: the scale is calibrated in embedding space; at layer L the router reads MLP inputs whose size is
    set by that layer's norm weight and whose direction has drifted from the embeddings, so the real logit
    spread differs (and routing is "distinctly less effective than hidden", as mergekit says).
    """
    layers = list(dict.fromkeys(int(layer) for layer in layers))
    if embedding_weight.dim() != 2:
        raise InvalidOptionError(f"embedding_weight must be [vocab, hidden], got shape {tuple(embedding_weight.shape)}.")
    vocab = embedding_weight.shape[0]

    def encode(prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = _content_ids(tokenizer, prompt, add_special_tokens=False)
        ids = ids[mask]
        if len(ids) and int(ids.max()) >= vocab:
            raise InvalidOptionError(
                f"Router prompts: the tokenizer gives token id {int(ids.max())} but the embedding has only {vocab} rows; "
                "use the dense model's own tokenizer."
            )
        return ids, torch.ones_like(ids, dtype=torch.bool)

    def embeddings(ids: torch.Tensor, mask: torch.Tensor) -> dict[int, torch.Tensor]:
        return {0: _rms_normalise(embedding_weight[ids.to(embedding_weight.device)].detach().float().cpu())}

    rows = _rows_from_vectors(prompts, num_experts, encode, embeddings, calibration_dtype=torch.float32,
                              logit_std=logit_std, center=center, max_calibration_tokens=max_calibration_tokens,
                              show_progress=show_progress)[0]
    return {layer: rows.clone() for layer in layers}


def rows_from_prompts(folder: Path, adapter, config, layers: list[int], reader, keys: Mapping[str, str],
                      options: UpcycleOptions, prompts: Sequence[ExpertPrompts] | None = None) -> dict[int, torch.Tensor]:
    """Router rows [E / G_r, H] per MoE layer for the converter, from the dense checkpoint in ``folder``, as
    ``options`` say (``router_init`` hidden or embedding, ``router_prompts``, ``router_logit_std``); ``prompts``
    (one per expert copy) instead of the ``router_prompts`` file when the caller has them (``mix`` recipes).

    ``embedding`` reads only the input-embedding tensor; ``hidden`` loads the dense model in float32 (the only
    step of a conversion that holds the whole model in memory).
    """
    from transformers import AutoTokenizer

    from .plan import DENSE_AUTO_CLASSES

    mode, num_copies = options.router_init, options.num_experts // options.routed_slices
    scale = {"num_experts": num_copies, "logit_std": options.router_logit_std}
    prompts = load_router_prompts(options.router_prompts) if prompts is None else prompts
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0]
        raise InvalidOptionError(f"router_init={mode!r} tokenises the prompts with the source's tokenizer, but {folder} has "
                                 f"none that loads ({reason}); add the tokenizer files or use router_init=random") from None
    auto = DENSE_AUTO_CLASSES[adapter.task]
    if mode == "embedding":
        with torch.device("meta"):
            dense = auto.from_config(config)
        embedding = dense.get_input_embeddings().weight
        name = next(n for n, p in dense.named_parameters() if p is embedding)
        weight = reader.get(keys[name]).float()
        return embedding_router_rows(weight, tokenizer, prompts, layers, **scale)
    model = auto.from_pretrained(folder, dtype=torch.float32).eval()
    dense_layers = model.get_submodule(adapter.decoder_layers_path)
    mlps = {i: getattr(dense_layers[i], adapter.mlp_module_name) for i in layers}
    return hidden_router_rows(model, tokenizer, prompts, layers, mlps, **scale)
