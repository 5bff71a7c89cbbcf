"""The paper's figures from evaluation rows (`evaluate.make_rows`), as PNG files.

  dice.png      Figure 3: Dice over Np (two-stage as a line; baseline and stage 1 as horizontal lines).
  flops.png     Figure 4: GFLOPs per image over Np, log scale.
  tradeoff.png  Soft Dice against GFLOPs per image (log scale): the quality/compute trade-off
                (--mode=benchmark draws the same against measured latency, tradeoff_latency.png).

Figures are drawn with matplotlib's Agg canvas directly (no pyplot, no global backend change).
"""

import os
from typing import Optional

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib import ticker

from iterseg import files

COLORS = {'baseline': 'tab:red', 'stage1': 'tab:gray', 'two_stage': 'tab:blue'}
LABELS = {'baseline': 'baseline (BL)', 'stage1': 'stage 1 (S1)', 'two_stage': 'two-stage (S2)'}
SHORT = {'baseline': 'BL', 'stage1': 'S1', 'two_stage': 'S2'}


def _split(rows):
  """({'baseline': row, 'stage1': row}, [two-stage rows sorted by Np])."""
  singles = {r['method']: r for r in rows if r['method'] != 'two_stage'}
  two = sorted((r for r in rows if r['method'] == 'two_stage'), key=lambda r: r['num_patches'])
  return singles, two


def _new_axes():
  fig = Figure(figsize=(5.5, 4), dpi=120)
  FigureCanvasAgg(fig)
  return fig, fig.add_subplot()


def _np_axis(ax, two):
  ax.set_xscale('log', base=2)
  ax.set_xlabel('number of patches per side $N_p$')
  if two:
    nps = [r['num_patches'] for r in two]
    ax.set_xticks(nps, [str(n) for n in nps])
    ax.minorticks_off()


def _save(fig, path):
  fig.tight_layout()
  files.atomic_write(path, lambda f: fig.savefig(f, format='png'), 'wb')
  return path


def plot_dice(rows, path: str, title: Optional[str] = None) -> str:
  """Figure 3: soft Dice (solid) and hard Dice (dashed) per method over Np."""
  singles, two = _split(rows)
  fig, ax = _new_axes()
  for name, r in singles.items():
    ax.axhline(r['soft_dice'], color=COLORS[name], label=LABELS[name])
    ax.axhline(r['hard_dice'], color=COLORS[name], linestyle='--', linewidth=0.8)
  if two:
    nps = [r['num_patches'] for r in two]
    ax.plot(nps, [r['soft_dice'] for r in two], 'o-', color=COLORS['two_stage'],
            label=LABELS['two_stage'])
    ax.plot(nps, [r['hard_dice'] for r in two], 'o--', color=COLORS['two_stage'], linewidth=0.8,
            markersize=3)
  _np_axis(ax, two)
  ax.set_ylabel('mean Dice per image (solid: soft, dashed: hard)')
  ax.set_title(title or 'Average Dice coefficient (Figure 3)')
  ax.grid(alpha=0.3)
  ax.legend()
  return _save(fig, path)


def plot_flops(rows, path: str, title: Optional[str] = None) -> str:
  """Figure 4: GFLOPs per image (networks, authors' accounting; dotted: whole compiled function)."""
  singles, two = _split(rows)
  fig, ax = _new_axes()
  for name, r in singles.items():
    ax.axhline(r['gflops'], color=COLORS[name], label=LABELS[name])
  if two:
    nps = [r['num_patches'] for r in two]
    ax.plot(nps, [r['gflops'] for r in two], 'o-', color=COLORS['two_stage'],
            label=LABELS['two_stage'])
    ax.plot(nps, [r['gflops_compiled'] for r in two], 'o:', color=COLORS['two_stage'],
            markersize=3, label='two-stage, whole compiled function')
  _np_axis(ax, two)
  ax.set_yscale('log')
  ax.set_ylabel('GFLOPs per image (XLA cost analysis)')
  ax.set_title(title or 'Floating-point operations (Figure 4)')
  ax.grid(alpha=0.3, which='both')
  ax.legend()
  return _save(fig, path)


TRADEOFF_AXES = {'gflops': 'GFLOPs per image (authors\' accounting, log scale)',
                 'latency_ms': 'latency per image (ms, log scale)'}


def plot_tradeoff(rows, path: str, x: str = 'gflops', title: Optional[str] = None
                  ) -> Optional[str]:
  """Soft Dice against rows[x] ('gflops' or 'latency_ms'); None (nothing written) when no row has
  that value."""
  timed = [r for r in rows if r.get(x) is not None and r.get('soft_dice') is not None]
  if not timed:
    return None
  fig, ax = _new_axes()
  for r in timed:
    label = SHORT[r['method']] + ('' if r['num_patches'] is None else f' Np={r["num_patches"]}')
    ax.scatter(r[x], r['soft_dice'], color=COLORS[r['method']])
    ax.annotate(label, (r[x], r['soft_dice']), textcoords='offset points',
                xytext=(4, 4), fontsize=7)
  two = sorted((r for r in timed if r['method'] == 'two_stage'), key=lambda r: r['num_patches'])
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
  ax.grid(alpha=0.3, which='both')
  return _save(fig, path)


def plot_native_benchmark(rows, path: str) -> str:
  """benchmark_native.png: seconds per megapixel against image side, two-stage and the dense
  sliding window (log-log), the speed-up written beside each size."""
  fig, ax = _new_axes()
  for method, color, label in (('two_stage', COLORS['two_stage'], 'two-stage'),
                               ('sliding_window', COLORS['baseline'], 'dense sliding window')):
    mine = sorted((r for r in rows if r['method'] == method), key=lambda r: r['side'])
    if mine:
      ax.plot([r['side'] for r in mine], [1 / r['mpix_per_s'] for r in mine], 'o-', color=color,
              label=label)
  for r in rows:
    if r.get('speedup'):
      ax.annotate(f'{r["speedup"]:.1f}x', (r['side'], 1 / r['mpix_per_s']), fontsize=7,
                  textcoords='offset points', xytext=(4, -10))
  ax.set_xscale('log', base=2)
  ax.set_yscale('log')
  sides = sorted({r['side'] for r in rows})
  ax.set_xticks(sides, [f'{s // 1024}k' if s >= 1024 else str(s) for s in sides])
  ax.minorticks_off()
  ax.set_xlabel('image side (px, square)')
  ax.set_ylabel('seconds per megapixel')
  ax.set_title('Native resolution: time against image size', fontsize=9)
  ax.grid(alpha=0.3, which='both')
  ax.legend()
  return _save(fig, path)


def plot_ablation(rows, path: str) -> str:
  """Soft Dice of the two-stage method with each feature off and on (bars), from ablation rows."""
  features = list(dict.fromkeys(r['feature'] for r in rows))
  fig, ax = _new_axes()
  for i, feature in enumerate(features):
    for j, state in enumerate(('off', 'on')):
      r = next((r for r in rows if r['feature'] == feature and r['state'] == state), None)
      if r is None:
        continue
      x = i + (j - 0.5) * 0.38
      ax.bar(x, r['soft_dice'], width=0.36, color='tab:gray' if state == 'off' else 'tab:blue',
             label=state if i == 0 else None)
      ax.annotate(f'{r["value"]}\n{r["soft_dice"]:.4f}', (x, r['soft_dice']), ha='center',
                  va='bottom', fontsize=6, textcoords='offset points', xytext=(0, 2))
  low = min(r['soft_dice'] for r in rows)
  ax.set_ylim(max(0.0, low - 0.05), min(1.0, max(r['soft_dice'] for r in rows) + 0.03))
  ax.set_xticks(range(len(features)), features)
  ax.set_ylabel('two-stage mean soft Dice (test split)')
  ax.set_title('Ablation: each feature off (paper) and on, the rest as configured', fontsize=9)
  ax.grid(alpha=0.3, axis='y')
  ax.legend()
  return _save(fig, path)


def plot_all(rows, workdir: str) -> list[str]:
  """dice.png, flops.png and tradeoff.png (Dice against GFLOPs) in workdir; the paths written."""
  paths = [plot_dice(rows, os.path.join(workdir, 'dice.png')),
           plot_flops(rows, os.path.join(workdir, 'flops.png')),
           plot_tradeoff(rows, os.path.join(workdir, 'tradeoff.png'))]
  return [p for p in paths if p]
