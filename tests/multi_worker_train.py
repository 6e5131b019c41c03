"""One worker of the MultiWorkerMirroredStrategy test: trains the custom loop
and, as the chief, saves the weights. Usage: TF_CONFIG=... python this.py out.npz REDUCTION"""

import sys

import numpy as np
import tensorflow as tf
import training_util

import tf_xent_ops as txo


def main(out_path, reduction):
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    loss = txo.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=None if reduction == "None" else reduction
    )
    weights = training_util.custom_loop(loss, strategy)
    if strategy.cluster_resolver.task_id == 0:
        np.savez(out_path, *weights)


if __name__ == "__main__":
    main(*sys.argv[1:3])
