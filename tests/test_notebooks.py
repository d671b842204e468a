"""The notebooks in notebooks/: committed without outputs, and each runs top to bottom with its
tiny parameters in a fresh kernel of this Python (nbclient), in a temporary directory.

Parameters are injected as papermill does, without papermill: the values of the cell tagged
"parameters" are replaced (each injected name must already be there, so a renamed parameter
fails here instead of being silently added).
"""

import glob
import json
import os
import re
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, 'notebooks', '*.ipynb')))
KERNEL = 'larp-jax-test'

# Per notebook, the values that make it a test-size run (WORK_DIR is the temp dir's runs/).
TINY = {
  'quickstart.ipynb': dict(TINY=True, STEPS=4, NUM_CLIPS=2, USAGE_CLIPS=4),
  'generate.ipynb': dict(TINY=True, TOKENIZER_STEPS=4, GENERATOR_STEPS=4, SAMPLES_PER_CLASS=1),
}


def _read(path):
  import nbformat

  return nbformat.read(path, as_version=4)


def _parameters_cell(nb):
  cells = [c for c in nb.cells if 'parameters' in c.get('metadata', {}).get('tags', [])]
  assert len(cells) == 1, 'a notebook needs exactly one cell tagged "parameters"'
  first_code = next(c for c in nb.cells if c.cell_type == 'code')
  assert cells[0] is first_code, 'the parameters cell must be the first code cell'
  return cells[0]


def inject(source: str, values: dict) -> str:
  """``source`` with the value of each ``NAME = ...`` line named in ``values`` replaced by
  ``repr(value)`` (a trailing comment kept)."""
  lines = source.splitlines()
  for name, value in values.items():
    pattern = re.compile(rf'^{re.escape(name)}\s*=\s*[^#]*?(\s+#.*)?$')
    hits = [i for i, l in enumerate(lines) if pattern.match(l)]
    assert len(hits) == 1, f'parameter {name} is not (once) in the parameters cell:\n{source}'
    comment = pattern.match(lines[hits[0]]).group(1) or ''
    lines[hits[0]] = f'{name} = {value!r}{comment}'
  return '\n'.join(lines)


def test_inject_replaces_values_and_refuses_unknown_names():
  src = "TINY = False  # small\nRUN_DIR = ''\nSTEPS = 300"
  assert inject(src, {'TINY': True, 'RUN_DIR': '/x'}) == (
    "TINY = True  # small\nRUN_DIR = '/x'\nSTEPS = 300"
  )
  with pytest.raises(AssertionError, match='NOPE'):
    inject(src, {'NOPE': 1})


def test_there_are_notebooks_and_each_has_tiny_parameters():
  names = sorted(os.path.basename(p) for p in NOTEBOOKS)
  assert names == sorted(TINY), names


@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_committed_notebook_is_stripped(path):
  """No outputs, no execution counts (so diffs show code only), one parameters cell first."""
  nb = _read(path)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == 'code':
      assert cell.outputs == [], f'cell {i} has outputs: clear them before committing'
      assert cell.execution_count is None, f'cell {i} has an execution count'
  params = _parameters_cell(nb).source
  for name in ('TINY', 'WORK_DIR', 'REPO_URL'):
    assert re.search(rf'^{name}\s*=', params, re.M), name
  url = re.search(r"^REPO_URL = '(.+)'", params, re.M).group(1)
  readme = open(os.path.join(ROOT, 'README.md')).read()
  repo = url.removeprefix('https://github.com/')
  badge = (
    f'https://colab.research.google.com/github/{repo}/blob/main/notebooks/{os.path.basename(path)}'
  )
  assert badge in readme, f'README has no Colab badge {badge}'
  assert badge in ''.join(c.source for c in nb.cells if c.cell_type == 'markdown')


@pytest.fixture
def kernel(tmp_path, monkeypatch):
  """A kernel spec for this very Python (a clean CI machine has none registered), CPU jax with
  XLA's optimisation passes off (as every test here), found through JUPYTER_PATH."""
  spec = tmp_path / 'jupyter' / 'kernels' / KERNEL
  spec.mkdir(parents=True)
  argv = [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}']
  (spec / 'kernel.json').write_text(
    json.dumps({'argv': argv, 'display_name': 'larp_jax tests', 'language': 'python'})
  )
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter'))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
  monkeypatch.setenv('MPLBACKEND', 'module://matplotlib_inline.backend_inline')
  monkeypatch.delenv('TF_CPP_MIN_LOG_LEVEL', raising=False)
  return KERNEL


def _outputs(nb, kind):
  return [
    o
    for c in nb.cells
    if c.cell_type == 'code'
    for o in c.outputs
    if o.output_type in ('display_data', 'execute_result') and kind in o.get('data', {})
  ]


@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_top_to_bottom(path, kernel, tmp_path):
  import nbformat
  from nbclient import NotebookClient

  nb = _read(path)
  cell = _parameters_cell(nb)
  values = dict(TINY[os.path.basename(path)], WORK_DIR=str(tmp_path / 'runs'))
  cell.source = inject(cell.source, values)
  work = tmp_path / 'cwd'
  work.mkdir()
  client = NotebookClient(
    nb, timeout=600, kernel_name=kernel, resources={'metadata': {'path': str(work)}}
  )
  try:
    client.execute()  # CellExecutionError (the cell and its traceback) on any failing cell
  finally:  # what ran, with its outputs and cell timings, for a look after a failure
    nbformat.write(nb, str(tmp_path / os.path.basename(path)))
  errors = [
    o for c in nb.cells if c.cell_type == 'code' for o in c.outputs if o.output_type == 'error'
  ]
  assert not errors, errors
  videos = [o for o in _outputs(nb, 'text/html') if '<video' in o['data']['text/html']]
  assert videos and all('data:video/mp4;base64,' in o['data']['text/html'] for o in videos)
  assert _outputs(nb, 'image/png'), 'no image shown'
  text = '\n'.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code' for o in c.outputs)
  assert 'device(s)' in text, text[-3000:]
  assert 'Traceback' not in text, text[-3000:]
  # Each run trained where the notebook was told to: its params directories.
  runs = tmp_path / 'runs'
  trained = sorted(p.parent.parent.name for p in runs.glob('*/params/params_info.json'))
  if os.path.basename(path) == 'quickstart.ipynb':
    assert trained == ['demo_tiny'], trained
    assert re.search(r'of 64 codes used', text), text[-3000:]
  else:
    assert trained == ['demo_ar_tiny', 'demo_tiny'], trained
    assert (runs / 'demo_tokens_tiny' / 'manifest.json').exists()
    assert len(videos) == 1 and videos[0]['data']['text/html'].count('<video') == 10
    assert np.isfinite(float(re.search(r'NLL ([0-9.]+)', videos[0]['data']['text/html'])[1]))


def test_notebook_helpers():
  from larp_jax import notebook

  assert [notebook.grid_shape(n) for n in (8, 64, 1024, 5)] == [(2, 4), (8, 8), (32, 32), (2, 4)]
  img = notebook.token_image(np.array([[0, 1, 2, 3, 4], [0, 0, 0, 0, 0]]), cell=2, gap=1)
  assert img.shape == (4, 2 * 8 + 1, 3) and img.dtype == np.uint8
  assert (img[:, 8] == 255).all()  # the gap
  assert (img[2:, 2:8] == 255).all()  # the unused cells of clip 0's last row
  assert (img[:2, :2] == img[:2, 9:11]).all() and not (img[:2, :2] == img[:2, 2:4]).all()
  use = notebook.codebook_counts(np.array([[0, 0, 1, 1]]), 8)
  assert use['used'] == 2 and use['usage'] == 0.25 and abs(use['perplexity'] - 2.0) < 1e-9
  assert use['counts'].tolist() == [2, 2, 0, 0, 0, 0, 0, 0]
  html = notebook.video_html(np.zeros((2, 8, 8, 3), np.float32), caption='c')
  assert html.count('<video') == 1 and 'data:video/mp4;base64,' in html and 'c</figcaption>' in html
  with pytest.raises(RuntimeError, match='exited with code 3; its last lines:\nboom'):
    notebook.run([sys.executable, '-c', 'print("boom"); raise SystemExit(3)'])
