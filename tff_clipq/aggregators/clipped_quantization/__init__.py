"""Mean of client values sent as clipped, uniformly quantized, bit-packed tensors (clipq).

Modules: `settings` (validated settings), `client` (the encode each client runs), `server`
(checks, weights and sums each payload), `measurements` (the mean and what is reported),
`factory` (the TFF computations, processes and factories).

Each client clips every large tensor of its value at a threshold (MSE-optimal by default),
quantizes it to B bits with nearest or stochastic rounding and packs the codes into int32 words.
The upload payload is: per quantized tensor the packed codes and the float32 threshold, plus
what the weighting needs (the per-tensor quantization errors e_i for inverse-error weighting, the
example count for FedAvg weighting, nothing for uniform weighting), one bool saying whether the
client takes part, and the small float32 tensors. Bits on the wire (`client_upload_bits`) are read
from the TFF type of that payload, not estimated. For its measurements this simulation also
gathers per-tensor diagnostics from each client (normalized MSE, clipped fraction, and e_i when
the weighting does not send it); they are counted separately (`diagnostic_bits_per_client`), and
a deployment would not send them.

The server decodes each payload inside `tff.federated_aggregate`'s accumulate step, so per-client
float values never cross the wire, and forms per tensor the weighted mean
sum_i w_i x_i / sum_i w_i with

  * 'inverse_error': w_i = 1 / e_i (Bozorgasl & Chen 2024): clients never reveal their example
    counts. A tensor quantized exactly (e_i = 0, e.g. all zeros) gets the weight of the round's
    most accurate other client for that tensor (or 1 if there is none): finite, never dominant;
  * 'inverse_normalized_error': w_i = 1 / (e_i / mean(x_i^2)), the scale-free variant: e_i grows
    with the size of a client's value, so 1 / e_i down-weights the clients whose updates move
    most; the normalized error does not. Same wire size and privacy as 'inverse_error';
  * 'example_count' (alias 'fedavg'): w_i = the client's weight (FedAvg);
  * 'uniform': w_i = 1.

With `sample_fraction` f < 1 each client sends, of every quantized tensor of n entries, the codes
of only k = max(1, ceil(f n)) entries, chosen uniformly without replacement; its threshold and
statistics are those of these entries. No index travels: the client sends one int32 seed, drawn
from the round's seed and its own data, and the server derives the same coordinates from it
(`tff_clipq.quantization.payload.selected_coordinates`). The seed has to travel with the payload
because the server decodes inside `tff.federated_aggregate`'s accumulate step, which sees the
payload and nothing else, and clients are anonymous there; a per-client seed (rather than the
round's seed alone) gives every client its own coordinates, so a round's mean covers more of
each tensor. The server scatters the decoded levels back scaled by n / k, zeros elsewhere: each
entry is sent with probability k / n, so with stochastic rounding the decoded tensor is unbiased.
With the inverse-error weightings e_i is the quantization error of the entries sent.

With `clipping='mean_optimal'` the clients clip at the threshold that minimizes the error of the
mean of K clients (`tff_clipq.quantization.clipping_threshold`): K is learned by the process, as
TFF's adaptive factories learn their norms: its state holds the effective number of clients of
the last round's mean, (sum w)^2 / sum w^2 of the weights the float tensors are averaged with
(1 before the first round), and broadcasts it with the round's seed.

Tensors smaller than `min_size_to_quantize` (biases) stay float32; they are weighted by the
example count ('example_count') or uniformly (otherwise, since their error is zero), multiplied
by the weight at the client and summed by `inner_agg_factory` (default `tff.aggregators.SumFactory`),
the way `tff.aggregators.MeanFactory` composes with its inner sum factories. A plain `SumFactory`
(stateless, no measurements) is carried out inside the quantized tensors' `federated_aggregate`
instead of as a second aggregation: the same sums, types and measurements, one less per-client
step in TFF's runtime.

A client whose value holds NaN or Inf, or (weighted factory) whose weight is not positive, is
rejected at the client: it sends zeros and a cleared flag. Weight 0 is how TFF's FedAvg client
work marks a client whose update was non-finite, so such clients never enter an average that
ignores weights. A payload that fails the server's checks (a non-finite or negative threshold,
error or weight, a set padding bit, a weight x threshold that overflows) is rejected at decode:
it decodes with zero thresholds and zero weights, and its statistics are removed with
`tf.where`, so even a NaN in a rejected payload cannot reach the mean.
Both kinds are counted in the measurements. The small float32 tensors go to `inner_agg_factory`
before the server sees the payload, so they cannot be checked at decode; a client that is
rejected at the client sends them as zeros. A round in which every client is rejected yields
zeros, like `MeanFactory(no_nan_division=True)`.
"""

from tff_clipq.aggregators.clipped_quantization.factory import build_codec
from tff_clipq.aggregators.clipped_quantization.factory import clipped_quantization_mean
from tff_clipq.aggregators.clipped_quantization.factory import clipped_quantization_sum
from tff_clipq.aggregators.clipped_quantization.factory import Codec
from tff_clipq.aggregators.clipped_quantization.factory import unweighted_clipped_quantization_mean
from tff_clipq.aggregators.clipped_quantization.settings import INVERSE_ERROR_WEIGHTINGS
from tff_clipq.aggregators.clipped_quantization.settings import QuantizationSettings
from tff_clipq.aggregators.clipped_quantization.settings import UNWEIGHTED_WEIGHTINGS
from tff_clipq.aggregators.clipped_quantization.settings import WEIGHTING_ALIASES
from tff_clipq.aggregators.clipped_quantization.settings import WEIGHTINGS
