"""The KL-penalty forms of ``actor.kl_form`` (torch-free, so the recipe checks the key before torch loads).

- ``reference``: FlowGRPO's reference code: the mean squared difference of the two means divided by
  ``2 std^2`` with the step's noise ``std = a * sqrt(s / (1 - s))`` (no ``dt``).
- ``transition``: the exact KL of the two Gaussian transitions (``std * sqrt(dt)``).
"""

KL_FORMS: tuple[str, ...] = ("reference", "transition")
