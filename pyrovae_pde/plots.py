"""Figures of a fit, as matplotlib Figures: look at a cohort, a fit and its posterior.

Each function takes the package's labelled outputs, draws on ``ax``/``axes`` if given (else on a
new figure) and returns the Figure; none chooses a backend. ``save_figure(fig, path)`` writes one
atomically. ``pyrovae-pde report RUN_DIR DATA.nc --out DIR`` writes them all with a summary::

    from pyrovae_pde import plots
    post = model.posterior(ds)
    plots.subtype_probabilities(post, truth=ds)     # subject x subtype matrix (+ true subtype strip)
    plots.parameters(post)                          # D vs r under the MAP subtype, 90% intervals
    plots.fields(ds, "sub-0001", fitted=model.forecast(ds, times, subjects=["sub-0001"]))
    plots.elbo_trace(model.history_.history)        # training and held-out ELBO
    plots.comparison(compare(...).table)            # log evidence differences, 2-SE bars
    plots.ppc(model.check(ds))                      # replicated vs observed statistics
    plots.forecast_bands(model.forecast(ds, [10, 12]), observed=ds)
    plots.sbc_ranks(simulation_based_calibration(model, ds))  # calibration: rank histograms
    plots.save_figure(fig, "figure.png")
"""
from .interfaces.plots import (  # noqa: F401
    comparison,
    elbo_trace,
    parameters,
    plot_comparison,
    plot_recovery,
    plot_training,
    ppc,
    save_figure,
    sbc_ranks,
    subtype_probabilities,
)
from .interfaces.plots_fields import centroids_of, fields, forecast_bands  # noqa: F401

__all__ = ["centroids_of", "comparison", "elbo_trace", "fields", "forecast_bands", "parameters", "plot_comparison",
           "plot_recovery", "plot_training", "ppc", "save_figure", "sbc_ranks",
           "subtype_probabilities"]
