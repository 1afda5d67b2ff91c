"""Token-level perplexity from summed negative log-likelihoods, as an ``evaluate`` metric module.

Loaded offline with ``evaluate.load("<path to this folder>")``. Unlike the Hub ``perplexity`` metric it
does not load a model: it aggregates what the evaluation loop measured, so the dense and the MoE model
are scored by the same code on the same blocks.
"""

import math

import datasets
import evaluate

_DESCRIPTION = "Perplexity exp(sum NLL / tokens) and mean token NLL over evaluation blocks."
_KWARGS = """
Args:
    predictions: summed negative log-likelihood (nats) of the predicted tokens of each block.
    references: number of predicted tokens in each block.
Returns:
    perplexity: exp(sum(predictions) / sum(references)).
    mean_nll: sum(predictions) / sum(references).
    tokens: sum(references).
"""


class TokenPerplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("float64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        tokens = int(sum(references))
        if tokens == 0:
            raise ValueError("token_perplexity needs at least one predicted token")
        mean_nll = float(sum(predictions)) / tokens
        return {"perplexity": math.exp(mean_nll), "mean_nll": mean_nll, "tokens": tokens}
