"""Bounded memory: with `keep_last`, a record keeps every recent step and thins older ones geometrically (`thin`),
whenever a quarter of `keep_last` new steps arrived and before anything reads it."""
from __future__ import annotations

import numpy as np

__all__ = []


class _Thinning:
    "`GradRecord`'s `thin` (and `_thin_if_due`, which its readers call first)."

    def thin(self):
        """Apply `keep_last`: keep every recorded step of the last `keep_last * every` optimizer steps and
        thin older ones geometrically: a step whose age (in optimizer steps, from the last recorded
        one) lies in [K * 2**k, K * 2**(k+1)), with K = keep_last * every, is kept only if its number
        is a multiple of every * 2**(k+1). The last two recorded steps are always kept (with `update_ratio` a
        step is complete only once the next one arrives: an exporter sends it then). `steps['kept_every']` says
        at which stride each kept step's neighbourhood survives. Kept steps are never changed. Called
        automatically, when a quarter of `keep_last` new steps arrived and whenever the record is read (`len`,
        `df`, `steps`, `hist`, `save`, `merge`); `last(back=...)` sees the steps held before that."""
        self._add_waiting()
        self._unthinned = 0
        if self.keep_last is None or not self._n_steps(): return
        steps = self._step_cols['step'].view
        window = self.keep_last * self.every
        age = steps[-1] - steps
        old = age >= window
        old[-2:] = False
        if not old.any(): return
        band = np.zeros(len(steps), np.int64)
        band[old] = np.floor(np.log2(age[old] / window)).astype(np.int64)
        stride = np.where(old, self.every * 2 ** (band + 1), self.every)
        keep = (steps % stride == 0) | ~old
        kept_every = self._step_cols['kept_every'].view
        np.maximum(kept_every, np.where(keep, stride, kept_every), out=kept_every)
        if keep.all(): return
        rows = np.repeat(keep, self._step_cols['n_rows'].view)
        for growable in (self._values, self._counts, self._row_layer, self._hist):
            if growable is not None: growable.compress(rows)
        self._lrs.compress(np.repeat(keep, self._step_cols['n_groups'].view))
        for growable in self._step_cols.values(): growable.compress(keep)
        self._cache.clear()

    def _thin_if_due(self):
        "Add the steps waiting, then apply `keep_last` if steps arrived since it last was."
        self._add_waiting()
        if self._unthinned and self.keep_last is not None: self.thin()
