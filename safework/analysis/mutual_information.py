"""Mutual information between each token's hidden state and a reference representation, estimated as MI-Peaks
(arXiv 2506.02867) does: normalised HSIC with a Gaussian kernel.

One hidden state is one vector, so the estimator's samples are its coordinates: token state h [D] and reference
r [D] are D paired observations (h_i, r_i), and HSIC measures how far the pairing is from independent (a state
whose large and small coordinates are where the reference's are scores high). The kernel is Gaussian with the
bandwidth set by each vector's own spread (sigma^2 = its variance, so the mean pairwise squared distance is
2 sigma^2), which makes the score invariant to a vector's scale and offset. Normalised,
nHSIC = HSIC(h, r) / sqrt(HSIC(h, h) HSIC(r, r)) lies in [0, 1].

Cost: the Gram matrix of a token is [D, D]; tokens go through in chunks (`lax.map`), so memory is
chunk * D^2 floats whatever the length, and time grows linearly with tokens and layers and quadratically with D.

Axis legend: T tokens, D hidden (the estimator's samples), C tokens per chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

EPS = 1e-12


def gaussian_gram(x: jax.Array) -> jax.Array:
  """[D] -> [D, D]: exp(-(x_i - x_j)^2 / (2 sigma^2)) with sigma^2 the variance of x (fp32)."""
  x = x.astype(jnp.float32)
  variance = jnp.var(x) + EPS
  return jnp.exp(-jnp.square(x[:, None] - x[None, :]) / (2 * variance))


def centred(gram: jax.Array) -> jax.Array:
  """H K H with H = I - 11^T / D: rows and columns of zero mean."""
  return gram - gram.mean(axis=0, keepdims=True) - gram.mean(axis=1, keepdims=True) + gram.mean()


def hsic(x: jax.Array, y: jax.Array) -> jax.Array:
  """The biased HSIC estimate tr(K H L H) / (D - 1)^2 between paired samples x [D] and y [D]."""
  d = x.shape[-1]
  return jnp.sum(centred(gaussian_gram(x)) * centred(gaussian_gram(y))) / (d - 1) ** 2


def normalised_hsic(x: jax.Array, y: jax.Array) -> jax.Array:
  kx, ky = centred(gaussian_gram(x)), centred(gaussian_gram(y))
  return jnp.sum(kx * ky) / jnp.sqrt(jnp.sum(kx * kx) * jnp.sum(ky * ky) + EPS)


@functools.partial(jax.jit, static_argnames=("chunk",))
def token_mutual_information(hidden: jax.Array, reference: jax.Array, chunk: int = 8) -> jax.Array:
  """nHSIC of every token's state against one reference: hidden [T, D], reference [D] -> [T] (fp32).

  The reference's centred Gram matrix is built once; tokens go `chunk` at a time, so at most chunk + 1 Gram
  matrices [D, D] exist at once.
  """
  t, d = hidden.shape
  ky = centred(gaussian_gram(reference))
  ky_norm = jnp.sum(ky * ky)
  pad = -t % chunk
  blocks = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(-1, chunk, d)

  def one(x):
    kx = centred(gaussian_gram(x))
    return jnp.sum(kx * ky) / jnp.sqrt(jnp.sum(kx * kx) * ky_norm + EPS)

  scores = jax.lax.map(lambda block: jax.vmap(one)(block), blocks)   # [T / C, C]
  return scores.reshape(-1)[:t]
