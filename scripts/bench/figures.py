"""The table of figures: name (for ``--only``) -> function(ctx) -> rows.

Every figure function takes the :class:`~.ctx.Ctx` and returns table
:class:`~.ctx.Row`\\ s; anything it learns that belongs in the tuning notes
goes to ``ctx.notes``.  A figure that cannot run raises :class:`~.util.Skip`
(or fails); the caller turns that into a row saying why, never into a number.
"""

from __future__ import annotations

from collections.abc import Callable

from .ctx import Ctx, Row
from .datapath_figures import fig_datapath
from .guest import fig_get
from .read_figures import fig_convert, fig_index, fig_restore, fig_seq
from .serve import fig_serve
from .slow_figures import fig_coldmount
from .write_figures import fig_fleecing, fig_latency, fig_size, fig_writer
from .zstd_figures import fig_zstd

FIGURES: dict[str, Callable[[Ctx], list[Row]]] = {
    "restore": fig_restore,
    "index": fig_index,
    "seq": fig_seq,
    "datapath": fig_datapath,
    "convert": fig_convert,
    "writer": fig_writer,
    "latency": fig_latency,
    "fleecing": fig_fleecing,
    "size": fig_size,
    "zstd": fig_zstd,
    "coldmount": fig_coldmount,
    "get": fig_get,
    "serve": fig_serve,
}
