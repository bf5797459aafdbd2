# -*- coding: utf-8 -*-
# Copyright: rkllm.fleet developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""rkllm.fleet.converged: a stamp recorded after a full run, and every kind of drift that must make
the next run a full one (site.yml's converged fast path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

from ansible_collections.rkllm.fleet.plugins.modules import converged

INPUTS = 'a' * 64


class FakeModule:
    """What converged.run needs from AnsibleModule; systemctl answers from `units`."""

    def __init__(self, units=None, check_mode=False):
        self.units = units if units is not None else {}
        self.check_mode = check_mode

    def get_bin_path(self, name, required=False):
        return '/bin/' + name

    def run_command(self, args):
        names = args[args.index('--') + 1:]
        blocks = []
        for name in names:
            active, enabled, pid = self.units.get(name, ('inactive', '', '0'))
            blocks.append('Id=%s\nActiveState=%s\nUnitFileState=%s\nMainPID=%s' % (name, active, enabled, pid))
        return 0, '\n\n'.join(blocks) + '\n', ''


def params(tmp, **kw):
    p = dict(path=os.path.join(tmp, 'state', 'converged.json'), state='check', inputs=INPUTS, paths=[], units=[],
             users=[], groups=[], packages=[], urls=[], absent=[], mapped_libraries=[], url_values=[], hash_limit=1024,
             url_timeout=2)
    p.update(kw)
    return p


@pytest.fixture
def board(tmp_path):
    """A small managed tree: a unit, a Modelfile, a big model file, a venv file, a link."""
    root = tmp_path / 'board'
    (root / 'etc').mkdir(parents=True)
    (root / 'etc' / 'rkllama.service').write_text('[Service]\nExecStart=/opt/rkllm/rkllama/current/venv/bin/python\n')
    models = root / 'models' / 'Qwen'
    models.mkdir(parents=True)
    (models / 'Modelfile').write_text('FROM="qwen.rkllm"\nHUGGINGFACE_PATH="Qwen/Qwen2.5"\n')
    (models / 'qwen.rkllm').write_bytes(b'\0' * 4096)  # above hash_limit: size, times and inode
    venv = root / 'release' / 'venv' / 'lib'
    venv.mkdir(parents=True)
    (venv / 'flask.py').write_text('app = 1\n')
    (root / 'release' / 'current').symlink_to('venv')
    (root / 'release' / '__pycache__').mkdir()
    return str(root)


def managed(board):
    return [os.path.join(board, 'etc', 'rkllama.service'), os.path.join(board, 'models'),
            {'path': os.path.join(board, 'release'), 'exclude': ['__pycache__'], 'stat_only': ['venv']}]


def record(tmp, board, module=None, **kw):
    p = params(tmp, state='present', paths=managed(board), **kw)
    return converged.run(module or FakeModule(), p)


def check(tmp, module=None, **kw):
    return converged.run(module or FakeModule(), params(tmp, **kw))


def test_unchanged_board_is_converged(tmp_path, board):
    tmp = str(tmp_path)
    rec = record(tmp, board)
    assert rec['changed'] and rec['files'] >= 8
    res = check(tmp)
    assert res['converged'], res['reasons']
    assert res['msg'] == 'converged, verified %d files, 0 units' % rec['files']
    assert not res['changed']


def test_stamp_is_root_only_and_rewritten_only_when_something_changed(tmp_path, board):
    tmp = str(tmp_path)
    record(tmp, board)
    st = os.stat(params(tmp)['path'])
    assert oct(st.st_mode & 0o777) == '0o600'
    assert not record(tmp, board)['changed']
    with open(os.path.join(board, 'etc', 'rkllama.service'), 'a') as f:
        f.write('# edited\n')
    assert record(tmp, board)['changed']


@pytest.mark.parametrize('drift, expected', [
    ('edit_unit', 'changed: {board}/etc/rkllama.service (content, size)'),
    ('edit_modelfile_same_size', 'changed: {board}/models/Qwen/Modelfile (content)'),
    ('remove_file', 'removed: {board}/models/Qwen/Modelfile'),
    ('add_file', 'new: {board}/models/Qwen/extra.rkllm'),
    ('chmod', 'changed: {board}/etc/rkllama.service (mode)'),
    ('touch_model', 'changed: {board}/models/Qwen/qwen.rkllm (change time, modification time)'),
    ('replace_venv_file', 'changed: {board}/release/venv/lib/flask.py'),
    ('retarget_link', 'changed: {board}/release/current (target)'),
])
def test_each_drift_makes_a_full_run(tmp_path, board, drift, expected):
    tmp = str(tmp_path)
    record(tmp, board)
    unit = os.path.join(board, 'etc', 'rkllama.service')
    modelfile = os.path.join(board, 'models', 'Qwen', 'Modelfile')
    if drift == 'edit_unit':
        with open(unit, 'a') as f:
            f.write('ExecStartPre=/bin/true\n')
    elif drift == 'edit_modelfile_same_size':
        text = open(modelfile).read()
        with open(modelfile, 'w') as f:
            f.write(text.replace('Qwen2.5', 'Qwen2.6'))
    elif drift == 'remove_file':
        os.unlink(modelfile)
    elif drift == 'add_file':
        open(os.path.join(board, 'models', 'Qwen', 'extra.rkllm'), 'w').close()
    elif drift == 'chmod':
        os.chmod(unit, 0o666)
    elif drift == 'touch_model':
        os.utime(os.path.join(board, 'models', 'Qwen', 'qwen.rkllm'))
    elif drift == 'replace_venv_file':
        path = os.path.join(board, 'release', 'venv', 'lib', 'flask.py')
        os.unlink(path)
        with open(path, 'w') as f:
            f.write('app = 2\n')
    elif drift == 'retarget_link':
        link = os.path.join(board, 'release', 'current')
        os.unlink(link)
        os.symlink('elsewhere', link)
    res = check(tmp)
    assert not res['converged']
    assert any(r.startswith(expected.format(board=board)) for r in res['reasons']), res['reasons']


def test_excluded_names_are_not_compared(tmp_path, board):
    tmp = str(tmp_path)
    record(tmp, board)
    open(os.path.join(board, 'release', '__pycache__', 'x.pyc'), 'w').close()
    assert check(tmp)['converged']


def test_changed_inputs_make_a_full_run(tmp_path, board):
    tmp = str(tmp_path)
    record(tmp, board)
    res = check(tmp, inputs='b' * 64)
    assert not res['converged']
    assert res['reasons'] == ['the inputs changed (variables, facts or the collection) since the last full run']


def test_stopped_or_disabled_unit_makes_a_full_run(tmp_path, board):
    tmp = str(tmp_path)
    running = {'rkllama.service': ('active', 'enabled', '42'), 'exo-rkllm.service': ('active', 'enabled', '43')}
    record(tmp, board, FakeModule(running), units=list(running))
    assert check(tmp, FakeModule(running))['converged']
    stopped = dict(running, **{'exo-rkllm.service': ('inactive', 'enabled', '0')})
    res = check(tmp, FakeModule(stopped))
    assert res['reasons'] == ['unit exo-rkllm.service: active inactive, recorded active']
    disabled = dict(running, **{'rkllama.service': ('active', 'disabled', '42')})
    assert not check(tmp, FakeModule(disabled))['converged']


def test_pending_work_makes_a_full_run(tmp_path, board):
    tmp = str(tmp_path)
    marker = os.path.join(tmp, 'rkllama-restart-pending')
    record(tmp, board, absent=[marker])
    assert check(tmp)['converged']
    open(marker, 'w').close()
    assert check(tmp)['reasons'] == ['%s exists (an earlier run left work pending)' % marker]


def test_process_running_another_library_makes_a_full_run(tmp_path, board):
    """The running rkllama has the runtime it started with mapped, not what `current` points to now."""
    tmp = str(tmp_path)
    lib_dir = os.path.join(tmp, 'runtime')
    os.makedirs(os.path.join(lib_dir, '1.2.3'))
    lib = os.path.join(lib_dir, '1.2.3', 'libc.so.6')
    open(lib, 'w').close()
    os.symlink('1.2.3', os.path.join(lib_dir, 'current'))
    # This test process is the "service": it has the real libc mapped, never the one in lib_dir.
    libc = [line.split(None, 5)[5].strip() for line in open('/proc/self/maps')
            if line.rstrip().endswith('/libc.so.6')]
    if not libc:
        pytest.skip('this Python has no libc.so.6 mapped')
    module = FakeModule({'rkllama.service': ('active', 'enabled', str(os.getpid()))})
    item = {'unit': 'rkllama.service', 'library': 'libc.so.6', 'path': os.path.join(lib_dir, 'current', 'libc.so.6')}
    record(tmp, board, module, units=['rkllama.service'], mapped_libraries=[item])
    res = check(tmp, module)
    assert not res['converged']
    assert res['reasons'][0].startswith('rkllama.service runs %s, not %s' % (libc[0], lib))
    # Recorded with the library it really runs: converged.
    item['path'] = libc[0]
    record(tmp, board, module, units=['rkllama.service'], mapped_libraries=[item])
    assert check(tmp, module)['converged']


def test_users_groups_and_packages(tmp_path, board):
    tmp = str(tmp_path)
    status = os.path.join(tmp, 'status')
    with open(status, 'w') as f:
        f.write('Package: git\nStatus: install ok installed\n\nPackage: nftables\nStatus: deinstall ok config-files\n\n'
                'Package: python3-venv\nStatus: install ok installed\n')
    assert converged.installed_packages(['git', 'nftables', 'python3-venv', 'curl'], status) == ['git', 'python3-venv']
    record(tmp, board, users=['root'], groups=['root'])
    assert check(tmp)['converged']
    data = json.load(open(params(tmp)['path']))
    assert data['users']['root']['uid'] == 0 and data['groups'] == {'root': 0}
    data['users']['root']['shell'] = '/bin/false-was-recorded'
    with open(params(tmp)['path'], 'w') as f:
        json.dump(data, f)
    assert check(tmp)['reasons'] == ['user root differs from the recorded one']


def test_url_that_does_not_answer_makes_a_full_run(tmp_path, board):
    tmp = str(tmp_path)
    record(tmp, board, urls=['http://127.0.0.1:9/'])
    assert check(tmp)['reasons'] == ['http://127.0.0.1:9/ does not answer']


def test_board_holding_another_model_makes_a_full_run(tmp_path, board):
    """A client made rkllama load another model (no file changed): the full run's model check puts it back."""
    import http.server
    import threading

    held = {'model': 'Qwen2.5-1.5B-Instruct'}

    class Rkllama(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            body = json.dumps({'model_name': held['model']}).encode()
            self.send_response(200)
            self.send_header('Content-Type', 'application/json')
            self.send_header('Content-Length', str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(('127.0.0.1', 0), Rkllama)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = 'http://127.0.0.1:%d/current_model' % server.server_address[1]
    try:
        tmp = str(tmp_path)
        record(tmp, board, url_values=[{'url': url, 'key': 'model_name', 'value': 'Qwen2.5-1.5B-Instruct'}])
        assert check(tmp)['converged'] is True
        held['model'] = 'DeepSeek-R1-1.5B'
        assert check(tmp)['reasons'] == ['%s reports model_name DeepSeek-R1-1.5B, not Qwen2.5-1.5B-Instruct' % url]
    finally:
        server.shutdown()
    # rkllama not answering at all (restarted, nothing loaded yet): a full run too.
    assert check(tmp)['reasons'] == ['%s reports model_name nothing, not Qwen2.5-1.5B-Instruct' % url]


@pytest.mark.parametrize('damage', ['missing', 'world_readable', 'link', 'garbage'])
def test_no_usable_stamp_makes_a_full_run(tmp_path, board, damage):
    tmp = str(tmp_path)
    record(tmp, board)
    path = params(tmp)['path']
    if damage == 'missing':
        os.unlink(path)
    elif damage == 'world_readable':
        os.chmod(path, 0o644)
    elif damage == 'link':
        os.rename(path, path + '.real')
        os.symlink(path + '.real', path)
    else:
        with open(path, 'w') as f:
            f.write('{')
    res = check(tmp)
    assert not res['converged'] and res['files'] == 0
    assert 'stamp' in res['reasons'][0]


def test_absent_removes_and_check_mode_changes_nothing(tmp_path, board):
    tmp = str(tmp_path)
    path = params(tmp)['path']
    assert converged.run(FakeModule(check_mode=True), params(tmp, state='present', paths=managed(board)))['changed']
    assert not os.path.exists(path)
    record(tmp, board)
    res = converged.run(FakeModule(check_mode=True), params(tmp, state='absent'))
    assert res['changed'] and os.path.exists(path)
    res = converged.run(FakeModule(), params(tmp, state='absent'))
    assert res['changed'] and not os.path.exists(path)
    assert not converged.run(FakeModule(), params(tmp, state='absent'))['changed']


def test_module_process_reports_no_stamp(tmp_path):
    """Run as Ansible runs it: a board without a stamp is not converged, and nothing is written."""
    args = {'ANSIBLE_MODULE_ARGS': {'path': str(tmp_path / 'converged.json'), 'inputs': INPUTS}}
    with tempfile.NamedTemporaryFile('w', suffix='.json', delete=False) as f:
        json.dump(args, f)
    try:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        proc = subprocess.run([sys.executable, converged.__file__, f.name], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env, check=False)
    finally:
        os.unlink(f.name)
    result = json.loads(proc.stdout)
    assert result['converged'] is False and result['changed'] is False
    assert result['reasons'][0].startswith('no stamp at ')
    assert not os.path.exists(str(tmp_path / 'converged.json'))
