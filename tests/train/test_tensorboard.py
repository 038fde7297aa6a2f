"""Optional TensorBoard logging (``config.tensorboard = True``) writes readable scalars.

Runs in a subprocess: TensorFlow (installed by ``./install.sh --test`` for the tfds
builders) is kept out of the test process that also holds torch.
"""
import subprocess
import sys
import textwrap


def test_tensorboard_writer_scalars_read_back(tmp_path):
    script = textwrap.dedent(f"""
        import glob
        from diffjax.train.writers import TensorBoardWriter
        w = TensorBoardWriter({str(tmp_path)!r})
        w.write(3, {{"loss": 1.5, "bpp": 0.25}})
        w.close()
        import tensorflow as tf
        seen = {{}}
        for f in glob.glob({str(tmp_path / "tensorboard" / "*")!r}):
            for e in tf.compat.v1.train.summary_iterator(f):
                for v in e.summary.value:
                    seen[v.tag] = (e.step, float(tf.make_ndarray(v.tensor)) if v.HasField("tensor")
                                   else v.simple_value)
        print(sorted(seen.items()))
        assert seen == {{"loss": (3, 1.5), "bpp": (3, 0.25)}}, seen
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env={"CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3",
                                            **__import__("os").environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
