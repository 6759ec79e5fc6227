"""The targets `round_time.py` judges its measurements by, and the ratios behind them.

Four targets, each met / not met / not measured on wall-time medians, with the same ratios in CPU
time beside them: ours without QAT within 5% of FedAvg; QAT adding <= 25% of local training; a
TFF round within 1.5x of the plain-TF floor; memory at most linear in the clients per round.
They are kept apart from the measuring so that `--retarget` can re-judge an earlier run's JSON.
"""

from __future__ import annotations

import collections
from typing import Any, Iterable, Optional

from benchmarks import bench_util
from benchmarks.round_time_measure import Measurement
from benchmarks.round_time_variants import FEDAVG
from benchmarks.round_time_variants import FLOOR
from benchmarks.round_time_variants import variant_spec

_OURS = ('clipq_2b', 'clipq_4b')


def _lookup(measurements: list[Measurement]) -> dict[tuple[str, int], Measurement]:
  return {(m.variant, m.clients_per_round): m for m in measurements}


def _seconds(m: Measurement, cpu: bool) -> float:
  return m.cpu_median_s if cpu else m.median_s


def ratio(
  measurements: list[Measurement],
  variant: str,
  reference: str,
  clients_per_round: int,
  cpu: bool = False,
) -> Optional[float]:
  """Median round time of `variant` over that of `reference` at K; None if either is missing.

  Args:
    measurements: the run's measurements.
    variant: the numerator's variant.
    reference: the denominator's variant.
    clients_per_round: K.
    cpu: compare CPU seconds instead of wall time.
  """
  table = _lookup(measurements)
  a, b = table.get((variant, clients_per_round)), table.get((reference, clients_per_round))
  if a is None or b is None or not _seconds(b, cpu):
    return None
  return _seconds(a, cpu) / _seconds(b, cpu)


def cpu_ratio(
  measurements: list[Measurement], variant: str, reference: str, clients_per_round: int
) -> Optional[float]:
  """`ratio` in CPU seconds.

  Args:
    measurements: the run's measurements.
    variant: the numerator's variant.
    reference: the denominator's variant.
    clients_per_round: K.
  """
  return ratio(measurements, variant, reference, clients_per_round, cpu=True)


def memory_is_at_most_linear(
  points: list[tuple[int, float]], slack_mb: float = 32.0
) -> Optional[bool]:
  """True unless the memory added per client grows from the first interval to the last.

  A superlinear curve has a larger slope on the last interval than on the first; `slack_mb` and
  25% absorb measurement noise.

  Args:
    points: (clients per round, peak MB), sorted by clients.
    slack_mb: the absolute tolerance.
  """
  if len(points) < 3:
    return None
  (k0, m0), (k1, m1), (k2, m2) = points[0], points[-2], points[-1]
  first_slope = max((m1 - m0) / (k1 - k0), 0.0)
  last_slope = (m2 - m1) / (k2 - k1)
  return last_slope * (k2 - k1) <= 1.25 * first_slope * (k2 - k1) + slack_mb


def rise_is_at_most_linear(
  points: list[tuple[int, float]], slack_mb: float = 32.0
) -> Optional[bool]:
  """True unless the memory a round adds per client at the largest K exceeds the smaller K's.

  A round's rise is small and noisy (allocator, garbage collection), so comparing slopes between
  neighbouring K would judge noise; this checks rise(K_max) <= 1.25 K_max max_k(rise(k) / k) +
  `slack_mb` over smaller k.

  Args:
    points: (clients per round, MB a round adds), sorted by clients.
    slack_mb: the absolute tolerance.
  """
  if len(points) < 2:
    return None
  *smaller, (k_max, rise_max) = points
  per_client = max(max(rise, 0.0) / k for k, rise in smaller)
  return rise_max <= 1.25 * k_max * per_client + slack_mb


def _ratios(
  measurements: list[Measurement],
  names: Iterable[str],
  reference: str,
  scales: list[int],
  cpu: bool,
) -> dict[str, Optional[float]]:
  """'{variant} K={k}' -> ratio to `reference`, for the variants of `names` that were run."""
  run = {m.variant for m in measurements}
  return {
    f'{v} K={k}': ratio(measurements, v, reference, k, cpu)
    for v in names
    if v in run
    for k in scales
  }


def _qat_overheads(
  measurements: list[Measurement], scales: list[int], cpu: bool
) -> dict[str, float]:
  """What QAT adds to local training, relative to the floor's time, per bits and K."""
  table = _lookup(measurements)
  values = {}
  for bits in (2, 4):
    for k in scales:
      with_qat, without = table.get((f'clipq_{bits}b_qat', k)), table.get((f'clipq_{bits}b', k))
      floor = table.get((FLOOR, k))
      if not floor or not _seconds(floor, cpu):
        continue
      floor_s = _seconds(floor, cpu)
      if with_qat and without:
        # Time QAT adds to a round, relative to the time of local training itself (the floor).
        values[f'clipq_{bits}b: (qat - no qat) / floor, K={k}'] = (
          _seconds(with_qat, cpu) - _seconds(without, cpu)
        ) / floor_s
      keras_qat = table.get((f'keras_qat_{bits}b', k))
      if keras_qat:
        values[f'keras_qat_{bits}b / keras - 1, K={k}'] = _seconds(keras_qat, cpu) / floor_s - 1
  return values


def _memory_target(
  measurements: list[Measurement], scales: list[int]
) -> tuple[dict[str, str], Optional[bool]]:
  """MB at each K per variant and process, and whether ours grow at most linearly.

  The worker starts afresh at every K, so its peak at K is what rounds of K clients need. This
  process lives through the whole run and keeps what earlier rounds left (see the note on
  dataset memory), so for it the rise during a round is used, per client (it is small and
  noisy: see `rise_is_at_most_linear`).
  """
  table = _lookup(measurements)
  values, met = {}, []
  for variant in sorted({m.variant for m in measurements}):
    for label, attribute in (
      ('worker peak', 'peak_worker_bytes'),
      ('main round rise', 'rise_main_bytes'),
    ):
      if variant_spec(variant).method is None and label == 'worker peak':
        continue
      points = [
        (k, getattr(table[(variant, k)], attribute) / bench_util.MB)
        for k in sorted(scales)
        if (variant, k) in table
      ]
      check = memory_is_at_most_linear if label == 'worker peak' else rise_is_at_most_linear
      linear = check(points)
      if linear is not None:
        values[f'{variant} {label}'] = ' -> '.join(f'{mb:.0f}' for _, mb in points)
        if variant_spec(variant).group == 'd':  # The target is about ours; others are context.
          met.append(linear)
        if not linear:
          values[f'{variant} {label}'] += ' (superlinear)'
  return values, (all(met) if met else None)


def evaluate_targets(measurements: list[Measurement], scales: list[int]) -> list[dict[str, Any]]:
  """The four targets, each met / not met / not measured, with the numbers.

  Args:
    measurements: the run's measurements.
    scales: the numbers of clients per round K that were run.
  """
  targets = []

  def add(name, limit, values, met=None, cpu_values=None):
    """`values` (wall time) decide met / not met; `cpu_values` are shown beside them."""
    values = {k: v for k, v in values.items() if v is not None}
    if met is None and limit is not None:
      met = all(v <= limit for v in values.values()) if values else None
    cpu_values = {k: v for k, v in (cpu_values or {}).items() if v is not None}
    targets.append(
      collections.OrderedDict(
        target=name, limit=limit, values=values, cpu_values=cpu_values, met=met
      )
    )

  def both(names, reference):
    """(wall, CPU) ratios of `names` to `reference` at every K."""
    return tuple(_ratios(measurements, names, reference, scales, cpu) for cpu in (False, True))

  wall, cpu = both(_OURS, FEDAVG)
  add(
    'aggregator overhead: clipq (no QAT) round / FedAvg round <= 1.05', 1.05, wall, cpu_values=cpu
  )
  add(
    'QAT overhead on local training <= 25%',
    0.25,
    _qat_overheads(measurements, scales, cpu=False),
    cpu_values=_qat_overheads(measurements, scales, cpu=True),
  )
  wall, cpu = both((FEDAVG,) + _OURS, FLOOR)
  add('whole round / compute floor <= 1.5', 1.5, wall, cpu_values=cpu)
  memory_values, memory_met = _memory_target(measurements, scales)
  add(
    'memory grows at most linearly with clients per round (MB at each K; judged on ours, clipq_*)',
    None,
    memory_values,
    met=memory_met,
  )
  return targets
