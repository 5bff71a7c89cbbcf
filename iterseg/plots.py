"""The paper's figures from evaluation rows (`evaluate.make_rows`), as PNG files.

  dice.png      Figure 3: Dice over Np (two-stage a line, baseline and stage 1 horizontal lines).
  flops.png     Figure 4: GFLOPs per image over Np, log scale.
  tradeoff.png  Soft Dice against GFLOPs per image (log scale): the quality/compute trade-off
                (--mode=benchmark draws the same against measured latency, tradeoff_latency.png).

Figures are drawn with matplotlib's Agg canvas directly (no pyplot, no global backend change).
"""

import math
import os
from typing import Optional

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib import ticker

from iterseg import files

COLORS = {'baseline': 'tab:red', 'stage1': 'tab:gray', 'two_stage': 'tab:blue'}
LABELS = {'baseline': 'baseline (BL)', 'stage1': 'stage 1 (S1)', 'two_stage': 'two-stage (S2)'}
SHORT = {'baseline': 'BL', 'stage1': 'S1', 'two_stage': 'S2'}


def _two_stage(rows):
  return sorted((r for r in rows if r['method'] == 'two_stage'), key=lambda r: r['num_patches'])


def _new_axes():
  return FigureCanvasAgg(Figure(figsize=(5.5, 4), dpi=120)).figure.add_subplot()


def _over_np(ax, rows, *lines):
  """rows[key] over Np per (key, style, matplotlib kwargs) of `lines`: baseline and stage 1
  horizontal, two-stage with markers 'o', each method labelled once. Returns the two-stage rows."""
  for r in rows:
    if r['method'] != 'two_stage':
      for i, (key, style, kw) in enumerate(lines):
        ax.axhline(r[key], color=COLORS[r['method']], linestyle=style,
                   label=None if i else LABELS[r['method']], **kw)
  two = _two_stage(rows)
  for i, (key, style, kw) in enumerate(lines if two else ()):
    ax.plot([r['num_patches'] for r in two], [r[key] for r in two], 'o' + style,
            color=COLORS['two_stage'], label=None if i else LABELS['two_stage'], **kw)
  return two


def _log2_x(ax, label, ticks, names=None):
  """A log2 x axis with ticks at `ticks` only, named `names` (default str(tick))."""
  ax.set_xscale('log', base=2)
  ax.set_xlabel(label)
  if ticks:
    ax.set_xticks(ticks, names or [str(t) for t in ticks])
    ax.minorticks_off()


def _save(ax, path, legend=True, **grid):
  """Grid (alpha 0.3, `grid` as ax.grid's arguments), legend, then the figure as PNG at `path`."""
  ax.grid(alpha=0.3, **grid)
  if legend:
    ax.legend()
  ax.figure.tight_layout()
  files.atomic_write(path, lambda f: ax.figure.savefig(f, format='png'), 'wb')
  return path


def plot_dice(rows, path: str, title: Optional[str] = None) -> str:
  """Figure 3: soft Dice (solid) and hard Dice (dashed) per method over Np."""
  ax = _new_axes()
  two = _over_np(ax, rows, ('soft_dice', '-', {}),
                 ('hard_dice', '--', {'linewidth': 0.8, 'markersize': 3}))
  _log2_x(ax, 'number of patches per side $N_p$', [r['num_patches'] for r in two])
  ax.set_ylabel('mean Dice per image (solid: soft, dashed: hard)')
  ax.set_title(title or 'Average Dice coefficient (Figure 3)')
  return _save(ax, path)


def plot_flops(rows, path: str, title: Optional[str] = None) -> str:
  """Figure 4: GFLOPs per image (networks, authors' accounting; dotted: whole compiled function)."""
  ax = _new_axes()
  two = _over_np(ax, rows, ('gflops', '-', {}))
  if two:
    ax.plot([r['num_patches'] for r in two], [r['gflops_compiled'] for r in two], 'o:',
            color=COLORS['two_stage'], markersize=3, label='two-stage, whole compiled function')
  _log2_x(ax, 'number of patches per side $N_p$', [r['num_patches'] for r in two])
  ax.set_yscale('log')
  ax.set_ylabel('GFLOPs per image (XLA cost analysis)')
  ax.set_title(title or 'Floating-point operations (Figure 4)')
  return _save(ax, path, which='both')


TRADEOFF_AXES = {'gflops': 'GFLOPs per image (authors\' accounting, log scale)',
                 'latency_ms': 'latency per image (ms, log scale)'}


def plot_tradeoff(rows, path: str, x: str = 'gflops', title: Optional[str] = None
                  ) -> Optional[str]:
  """Soft Dice against rows[x] ('gflops' or 'latency_ms'); None (nothing written) when no row has
  that value."""
  timed = [r for r in rows if r.get(x) is not None and r.get('soft_dice') is not None]
  if not timed:
    return None
  ax = _new_axes()
  for r in timed:
    label = SHORT[r['method']] + ('' if r['num_patches'] is None else f' Np={r["num_patches"]}')
    ax.scatter(r[x], r['soft_dice'], color=COLORS[r['method']])
    ax.annotate(label, (r[x], r['soft_dice']), textcoords='offset points',
                xytext=(4, 4), fontsize=7)
  two = _two_stage(timed)
  if len(two) > 1:
    ax.plot([r[x] for r in two], [r['soft_dice'] for r in two], '-',
            color=COLORS['two_stage'], alpha=0.5)
  ax.set_xscale('log')
  ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
  ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f'{v:g}'))
  ax.xaxis.set_minor_locator(ticker.NullLocator())
  ax.margins(x=0.25, y=0.1)
  ax.set_xlabel(TRADEOFF_AXES[x])
  ax.set_ylabel('mean soft Dice per image')
  ax.set_title(title or f'Quality against {"speed" if x == "latency_ms" else "compute"} (BL: '
               f'baseline, S1: stage 1, S2: two-stage)', fontsize=9)
  return _save(ax, path, legend=False, which='both')


def plot_benchmark(rows, path: str) -> str:
  """benchmark.png: seconds per megapixel against image side (the side of a square of the input's
  pixels), two-stage and the baseline (at native size, the dense sliding window), log-log, the
  speed-up written beside each size."""
  ax = _new_axes()
  side = lambda r: round(math.sqrt(math.prod(map(int, r['size'].split('x')))))  # 'HxW'.
  for method, label in (('two_stage', 'two-stage'), ('baseline', 'baseline (dense)')):
    mine = sorted((r for r in rows if r['method'] == method), key=side)
    if mine:
      ax.plot([side(r) for r in mine], [1 / r['mpix_per_s'] for r in mine], 'o-',
              color=COLORS[method], label=label)
  for r in rows:
    if r['method'] == 'two_stage' and r.get('speedup_vs_baseline'):
      ax.annotate(f'{r["speedup_vs_baseline"]:.1f}x', (side(r), 1 / r['mpix_per_s']), fontsize=7,
                  textcoords='offset points', xytext=(4, -10))
  ax.set_yscale('log')
  sides = sorted({side(r) for r in rows})
  _log2_x(ax, 'image side (px)', sides, [f'{s / 1024:g}k' if s >= 1024 else str(s) for s in sides])
  ax.set_ylabel('seconds per megapixel')
  ax.set_title('Time against image size', fontsize=9)
  return _save(ax, path, which='both')


def plot_ablation(rows, path: str) -> str:
  """Soft Dice of the two-stage method with each feature off and on (bars), from ablation rows."""
  features = list(dict.fromkeys(r['feature'] for r in rows))
  ax = _new_axes()
  for r in rows:  # Per feature, 'off' then 'on' (as `ablation.variants` orders them).
    i, off = features.index(r['feature']), r['state'] == 'off'
    x = i + (-0.5 if off else 0.5) * 0.38
    ax.bar(x, r['soft_dice'], width=0.36, color='tab:gray' if off else 'tab:blue',
           label=r['state'] if i == 0 else None)
    ax.annotate(f'{r["value"]}\n{r["soft_dice"]:.4f}', (x, r['soft_dice']), ha='center',
                va='bottom', fontsize=6, textcoords='offset points', xytext=(0, 2))
  dice = [r['soft_dice'] for r in rows]
  ax.set_ylim(max(0.0, min(dice) - 0.05), min(1.0, max(dice) + 0.03))
  ax.set_xticks(range(len(features)), features)
  ax.set_ylabel('two-stage mean soft Dice (test split)')
  ax.set_title('Ablation: each feature off (paper) and on, the rest as configured', fontsize=9)
  return _save(ax, path, axis='y')


def plot_all(rows, workdir: str) -> list[str]:
  """dice.png, flops.png and tradeoff.png (Dice against GFLOPs) in workdir; the paths written."""
  paths = [plot_dice(rows, os.path.join(workdir, 'dice.png')),
           plot_flops(rows, os.path.join(workdir, 'flops.png')),
           plot_tradeoff(rows, os.path.join(workdir, 'tradeoff.png'))]
  return [p for p in paths if p]
