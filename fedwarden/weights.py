"""Keras weight lists <-> one flat float32 vector (the row layout of the round's update matrix)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WeightLayout:
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, weights: list[np.ndarray]) -> WeightLayout:
        return cls(tuple(tuple(w.shape) for w in weights))

    @property
    def size(self) -> int:
        return int(sum(np.prod(s, dtype=np.int64) for s in self.shapes))

    def output_layer_size(self) -> int:
        """How many of the flat vector's last values are the model's output layer: its kernel
        and bias (a 1-D last array whose length ends the shape before it), or the last array
        alone; 0 for no weights."""
        if not self.shapes:
            return 0
        last = self.shapes[-1]
        kernel = self.shapes[-2] if len(self.shapes) > 1 else None
        sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes[-2:]]
        if len(last) == 1 and kernel and len(kernel) > 1 and kernel[-1] == last[0]:
            return sum(sizes)
        return sizes[-1]

    def output_kernel(self) -> tuple[int, int] | None:
        """``(inputs, classes)`` of the output layer's kernel when the model ends in a dense layer
        with a bias (a 2-D kernel whose columns the 1-D last array matches), else None."""
        if len(self.shapes) < 2:
            return None
        kernel, bias = self.shapes[-2], self.shapes[-1]
        if len(kernel) == 2 and len(bias) == 1 and kernel[1] == bias[0]:
            return int(kernel[0]), int(kernel[1])
        return None

    def flatten(self, weights: list[np.ndarray]) -> np.ndarray:
        got = tuple(tuple(np.shape(w)) for w in weights)
        if got != self.shapes:
            raise ValueError(f"weight shapes {got} do not match the model's {self.shapes}")
        return np.concatenate([np.ravel(w) for w in weights]).astype(np.float32, copy=False)

    def unflatten(self, vector: np.ndarray) -> list[np.ndarray]:
        if vector.shape != (self.size,):
            raise ValueError(
                f"expected a vector of {self.size} values. Received shape {vector.shape}"
            )
        cuts = np.cumsum([int(np.prod(s, dtype=np.int64)) for s in self.shapes])[:-1]
        return [part.reshape(shape) for part, shape in zip(np.split(vector, cuts), self.shapes)]
