import subprocess
import sys
import textwrap


def test_serving_imports_no_torch_or_training():
    code = textwrap.dedent("""
        import sys
        import serving.batch, serving.face, serving.image, serving.runtime, serving.service, serving.table
        leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'training'))
        print(','.join(leaked))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_training_commands_without_the_train_extra_say_so_in_one_line():
    for command in ("train", "export"):
        code = textwrap.dedent(f"""
            import sys
            sys.modules['torch'] = None  # as in a serving-only install: `import torch` fails
            from training.cli import {command}
            {command}(['--help'])
        """)
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.strip().splitlines() == [f"agegroup-{command}: error: the `train` extra is not installed "
                                                      "(torch is missing): pip install -e '.[train]'"]
