"""When a fit starts and ends, for the callbacks of this package (`GradStats`, the exporters, the live view): fastai
sends `before_fit` and `after_fit` also around validation and prediction, which must neither reset nor end a fit."""
from __future__ import annotations

__all__ = []


class _FitScope:
    """A callback mixin: `start_fit` at the first `before_train` of a fit, `end_fit` at that fit's `after_fit`.

    fastai's `validate`, `get_preds`, `predict` and `Learner.summary` send `before_fit` and `after_fit` too, with
    no `before_train` between, also from inside a running fit (a callback that validates after each epoch): those
    pairs must neither reset nor end what the fit set up. A fit stopped by an exception other than fastai's
    cancellations (KeyboardInterrupt) never sends `after_fit`: the next fit starts afresh all the same."""
    _fits = None  # per `before_fit` not yet closed by its `after_fit`: whether its fit started (`start_fit` ran)

    def before_fit(self):
        if self._fits is None: object.__setattr__(self, '_fits', [])
        self._fits.append(False)

    def before_train(self):
        fits = self._fits
        if fits and not fits[-1]:
            fits[-1] = True
            self.start_fit()

    def after_fit(self):
        if self._fits and self._fits.pop(): self.end_fit()

    def start_fit(self): pass
    def end_fit(self): pass
