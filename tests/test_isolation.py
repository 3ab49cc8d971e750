import subprocess
import sys
import textwrap


def test_serving_imports_no_torch_or_training():
    code = textwrap.dedent("""
        import sys
        import serving.batch, serving.image, serving.runtime, serving.service, serving.table
        leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'training'))
        print(','.join(leaked))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
