"""What each router kind means for a conversion, one row per kind: how the routed experts are scaled so that the
MoE block starts exactly at the dense MLP, and which router initialisations keep that exact.

The runtime side of a kind (scoring rule, bias buffer, default loss weights, the card's sentence, whether native
Mixtral-style classes compute it) is its class in ``modeling/routers.py``; a new kind is that class and a row here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..modeling.routers import ROUTERS, Router, SigmoidRouter, SoftmaxTopKRouter, TopKRenormRouter


@dataclass(frozen=True)
class RouterRecipe:
    router: type[Router]
    exact_inits: tuple[str, ...] | None = None  # router initialisations that keep the conversion exact; None: any

    @property
    def kind(self) -> str:
        return self.router.kind

    def expert_scale(self, num_experts: int, top_k: int, routed_slices: int) -> float:
        """Factor on the routed experts' output projections that keeps the block exact (He et al. 2024, sec. 3).

        Renormalised weights of one virtual group sum to 1/G_r per slice, so slices are scaled by G_r; without
        renormalisation a uniform router gives each of the k selected experts 1/E, so they are scaled by
        E x G_r / k (exact only for a uniform router and G_r = 1).
        """
        return float(routed_slices) if self.router.weights_sum_to_one else num_experts * routed_slices / top_k

    def default_init(self, routed_slices: int) -> str:
        """``router_init=auto``: the exact initialisation where one exists without slices (ties across virtual
        groups of slices would select incomplete groups), else ``random``."""
        return self.exact_inits[0] if self.exact_inits and routed_slices == 1 else "random"

    def inexact_reason(self, router_init: str) -> str | None:
        if self.exact_inits is None or router_init in self.exact_inits:
            return None
        return (f"router_type={self.kind} with router_init={router_init} (only a uniform router, router_init="
                f"{' or '.join(self.exact_inits)}, is exact)")


ROUTER_RECIPES: dict[str, RouterRecipe] = {recipe.kind: recipe for recipe in (
    RouterRecipe(TopKRenormRouter),
    RouterRecipe(SoftmaxTopKRouter, exact_inits=("zero",)),
    RouterRecipe(SigmoidRouter),
)}
assert ROUTER_RECIPES.keys() == ROUTERS.keys(), "every runtime router kind needs its conversion row"

__all__ = ["ROUTER_RECIPES", "RouterRecipe"]
