# -*- coding: utf-8 -*-
# Copyright: rkllm.fleet developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Validation and quoting of the values that go into units, Modelfiles and paths on a board.

The roles' preflight tasks refuse bad input with the sentences these filters return (each names
the variable and the bad value); the unit templates quote what they insert with the quoting
filters, so a value can't add a directive or lose a ``%``.
Each filter is documented in its own ``<name>.yml`` beside this file.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import re

from ansible.errors import AnsibleFilterError

PLATFORMS = ('rk3588', 'rk3576')
MODEL_NAME_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$')
# Hugging Face repo ids: "org/name", letters, digits, . _ -; "--" and ".." are refused by the Hub
# and "--" would also break the cache layout (models--org--name).
HF_REPO_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$')
COMMIT_RE = re.compile(r'^[0-9a-f]{40}$')
REF_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$')
PATH_PART_RE = re.compile(r'^[A-Za-z0-9_][A-Za-z0-9._+-]{0,254}$')
SHA256_RE = re.compile(r'^[0-9a-f]{64}$')
GIT_BLOB_RE = re.compile(r'^[0-9a-f]{40}$')
URL_RE = re.compile(r'^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?/[A-Za-z0-9._~!$&()*+,;=:@%/-]*$')
MODELFILE_KEY_RE = re.compile(r'^[A-Z][A-Z0-9_]*$')
ENV_KEY_RE = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*$')
CONTROL_RE = re.compile(r'[\x00-\x1f\x7f]')
# Keys the role writes itself from the catalog (FROM, HUGGINGFACE_PATH): a modelfile entry must
# not override them.
MODELFILE_RESERVED = ('FROM', 'HUGGINGFACE_PATH')


def _show(value):
    """A value as it appears in a message: JSON, so newlines and quotes are visible."""
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError):
        return repr(value)


def _is_scalar(value):
    return isinstance(value, (str, int, float, bool)) and value is not None


def safe_relpath(value):
    """True for a relative path of safe parts: no leading dot in any part, no '..', not absolute."""
    if not isinstance(value, str) or not value or value.startswith('/'):
        return False
    return all(PATH_PART_RE.match(part) for part in value.split('/'))


def safe_revision(value):
    return isinstance(value, str) and bool(COMMIT_RE.match(value) or (REF_RE.match(value) and '..' not in value))


def hf_repo(value):
    return isinstance(value, str) and bool(HF_REPO_RE.match(value)) and '--' not in value and '..' not in value


def _control_free(value):
    return _is_scalar(value) and not CONTROL_RE.search(str(value))


def _file_problems(where, entry, allow_unpinned, has_name_key):
    problems = []
    if not isinstance(entry, dict):
        return ['%s must be a dict, not %s.' % (where, _show(entry))]
    name_key = 'name' if has_name_key else 'file'
    if entry.get('sha256') is not None and not (isinstance(entry['sha256'], str) and SHA256_RE.match(entry['sha256'])):
        problems.append('%s.sha256 %s is not a sha256 (64 lowercase hex digits).' % (where, _show(entry['sha256'])))
    if entry.get('git_blob') is not None and not (isinstance(entry['git_blob'], str) and GIT_BLOB_RE.match(entry['git_blob'])):
        problems.append('%s.git_blob %s is not a git blob id (40 lowercase hex digits).' % (where, _show(entry['git_blob'])))
    if entry.get('size') is not None and (isinstance(entry['size'], bool) or not isinstance(entry['size'], int) or entry['size'] < 0):
        problems.append('%s.size %s is not a size in bytes.' % (where, _show(entry['size'])))
    if name_key in entry and not safe_relpath(entry[name_key]):
        problems.append(
            '%s.%s %s is not a safe file name: a relative path of letters, digits, . _ + - (no part starting '
            'with a dot, no "..", not absolute).' % (where, name_key, _show(entry[name_key])))
    if not has_name_key:
        if 'repo' in entry and not hf_repo(entry['repo']):
            problems.append('%s.repo %s is not a Hugging Face repository id (org/name: letters, digits, . _ -).'
                            % (where, _show(entry['repo'])))
        if 'revision' in entry and not safe_revision(entry['revision']):
            problems.append('%s.revision %s is neither a commit id (40 hex digits) nor a safe ref name '
                            '(letters, digits, . _ -).' % (where, _show(entry['revision'])))
        if 'url' in entry and not (isinstance(entry['url'], str) and URL_RE.match(entry['url'])):
            problems.append('%s.url %s is not a plain http(s) URL.' % (where, _show(entry['url'])))
        if 'url' not in entry and not ('repo' in entry and name_key in entry):
            problems.append('%s needs repo and file (a Hugging Face file) or url.' % where)
        pinned = entry.get('sha256') is not None or entry.get('git_blob') is not None
        revision = entry.get('revision', 'main')
        if not pinned and 'url' not in entry and not allow_unpinned and not (
                isinstance(revision, str) and COMMIT_RE.match(revision)):
            problems.append(
                '%s is not pinned: revision %s is a moving ref and no sha256 is given, so what the mirror or '
                'Hugging Face serves under it today would be installed (and a later run could install another '
                'file). Pin it with sha256 (the SHA256 Hugging Face shows on the file\'s page, or the X-Linked-Etag of '
                '`curl -sI https://huggingface.co/REPO/resolve/main/FILE`) or with the commit id as revision '
                '(`curl -s https://huggingface.co/api/models/REPO/revision/main` shows it as "sha"), or set '
                'rkllama_allow_unpinned_models: true to trust the mirror.' % (where, _show(revision)))
    return problems


def catalog_problems(models, variable='rkllama_models', allow_unpinned=False):
    """One sentence per bad field of a model catalog, naming the field and the bad value."""
    if not isinstance(models, list):
        return ['%s must be a list of catalog entries, not %s.' % (variable, _show(models))]
    problems = []
    for i, m in enumerate(models):
        if not isinstance(m, dict):
            problems.append('%s[%d] must be a dict, not %s.' % (variable, i, _show(m)))
            continue
        name = m.get('name')
        where = '%s[%d]' % (variable, i)
        if not (isinstance(name, str) and MODEL_NAME_RE.match(name)):
            problems.append('%s.name %s is not a safe model name (letters, digits, . _ -, starting with a letter '
                            'or digit).' % (where, _show(name)))
        else:
            where = '%s[%d] (%s)' % (variable, i, name)
        tok = m.get('tokenizer')
        if not isinstance(tok, dict):
            problems.append('%s.tokenizer must be a dict with repo, revision and files, not %s.' % (where, _show(tok)))
        else:
            if not hf_repo(tok.get('repo')):
                problems.append('%s.tokenizer.repo %s is not a Hugging Face repository id (org/name: letters, '
                                'digits, . _ -).' % (where, _show(tok.get('repo'))))
            rev = tok.get('revision')
            if not safe_revision(rev):
                problems.append('%s.tokenizer.revision %s is neither a commit id (40 hex digits) nor a safe ref '
                                'name.' % (where, _show(rev)))
            elif not COMMIT_RE.match(rev) and not allow_unpinned:
                problems.append(
                    '%s.tokenizer.revision %s is a moving ref: give the commit id (40 hex digits), or set '
                    'rkllama_allow_unpinned_models: true to trust the mirror.' % (where, _show(rev)))
            files = tok.get('files')
            if not isinstance(files, list) or not files:
                problems.append('%s.tokenizer.files must be a non-empty list, not %s.' % (where, _show(files)))
            else:
                for j, f in enumerate(files):
                    fwhere = '%s.tokenizer.files[%d]' % (where, j)
                    if isinstance(f, str):
                        if not safe_relpath(f):
                            problems.append(
                                '%s %s is not a safe file name: a relative path of letters, digits, . _ + - (no '
                                'part starting with a dot, no "..", not absolute).' % (fwhere, _show(f)))
                    elif isinstance(f, dict) and 'name' in f:
                        problems.extend(_file_problems(fwhere, f, allow_unpinned, True))
                    else:
                        problems.append('%s must be a file name or a dict with name, not %s.' % (fwhere, _show(f)))
        files = m.get('files')
        if not isinstance(files, dict):
            problems.append('%s.files must be a dict per platform (%s), not %s.' % (where, ', '.join(PLATFORMS), _show(files)))
        else:
            for platform in sorted(files, key=str):
                if platform not in PLATFORMS:
                    problems.append('%s.files has %s, which is not a platform (%s).'
                                    % (where, _show(platform), ', '.join(PLATFORMS)))
                    continue
                problems.extend(_file_problems('%s.files.%s' % (where, platform), files[platform], allow_unpinned, False))
        modelfile = m.get('modelfile', {})
        if not isinstance(modelfile, dict):
            problems.append('%s.modelfile must be a dict of settings, not %s.' % (where, _show(modelfile)))
        else:
            for key in sorted(modelfile, key=str):
                value = modelfile[key]
                if not (isinstance(key, str) and MODELFILE_KEY_RE.match(key)):
                    problems.append('%s.modelfile key %s is not a Modelfile key (^[A-Z][A-Z0-9_]*$).' % (where, _show(key)))
                elif key in MODELFILE_RESERVED:
                    problems.append('%s.modelfile sets %s, which the role writes from the catalog; remove it.' % (where, key))
                if not _control_free(value):
                    problems.append('%s.modelfile.%s value %s must be one line of text (no newline or other '
                                    'control character).' % (where, key, _show(value)))
        if m.get('min_memory_mb') is not None and (isinstance(m['min_memory_mb'], bool) or not isinstance(m['min_memory_mb'], int)):
            problems.append('%s.min_memory_mb %s is not a number of MB.' % (where, _show(m['min_memory_mb'])))
    return problems


def environment_problems(environment, variable):
    """One sentence per bad key or value of a service environment dict (``*_environment``)."""
    if not isinstance(environment, dict):
        return ['%s must be a dict of NAME: value, not %s.' % (variable, _show(environment))]
    problems = []
    for key in sorted(environment, key=str):
        value = environment[key]
        if not (isinstance(key, str) and ENV_KEY_RE.match(key)):
            problems.append('%s key %s is not an environment variable name (^[A-Za-z_][A-Za-z0-9_]*$).' % (variable, _show(key)))
        if not _control_free(value):
            problems.append('%s.%s value %s must be one line of text (no newline or other control character).'
                            % (variable, key, _show(value)))
    return problems


def exec_args_problems(args, variable):
    """One sentence per argument of ``*_extra_args`` that is not a single safe token."""
    if not isinstance(args, list):
        return ['%s must be a list of arguments, not %s.' % (variable, _show(args))]
    problems = []
    for i, arg in enumerate(args):
        if not _is_scalar(arg) or isinstance(arg, bool) or str(arg) == '':
            problems.append('%s[%d] %s must be a non-empty string.' % (variable, i, _show(arg)))
        elif CONTROL_RE.search(str(arg)) or re.search(r'\s', str(arg)):
            problems.append('%s[%d] %s must be one argument without spaces, newlines or other control characters: '
                            'give each argument as its own list item (for example "--flag", "value").'
                            % (variable, i, _show(arg)))
    return problems


def _escape(value):
    return str(value).replace('\\', '\\\\').replace('"', '\\"').replace('%', '%%')


def systemd_env_value(value):
    """The inside of ``Environment="KEY=value"``: backslash and quote escaped, ``%`` doubled."""
    if CONTROL_RE.search(str(value)):
        raise AnsibleFilterError('%s has a control character; it can not go into a unit file.' % _show(value))
    return _escape(value)


def systemd_exec_arg(value):
    """One ``ExecStart=`` argument, double-quoted: backslash and quote escaped, ``%`` and ``$`` doubled."""
    if CONTROL_RE.search(str(value)):
        raise AnsibleFilterError('%s has a control character; it can not go into a unit file.' % _show(value))
    return '"%s"' % _escape(value).replace('$', '$$')


def installed_models(model_files, tokenizer_files):
    """What the rkllama role installed on a board, for fleet-state: per model its file and tokenizer identities."""
    out = {}
    for f in model_files or []:
        entry = out.setdefault(f['model'], {})
        entry['file'] = {k: f.get(k) for k in ('repo', 'revision', 'path', 'url', 'sha256', 'git_blob', 'size')}
    for f in tokenizer_files or []:
        entry = out.setdefault(f['model'], {})
        tok = entry.setdefault('tokenizer', {'repo': f.get('repo'), 'revision': f.get('revision'), 'files': {}})
        tok['files'][f['path']] = {k: f.get(k) for k in ('sha256', 'git_blob')}
    return out


def pin_catalog(models, installed, platform):
    """The catalog with each model's ``platform`` file pinned to the sha256 recorded in ``installed``.

    Used to roll a board back to exactly the model files it ran, whatever the catalog's refs now name.
    """
    if not installed:
        return models
    out = []
    for m in models or []:
        rec = (installed or {}).get(m.get('name')) if isinstance(m, dict) else None
        f = (m.get('files') or {}).get(platform) if isinstance(m, dict) else None
        if not rec or not isinstance(f, dict) or not rec.get('file'):
            out.append(m)
            continue
        got = rec['file']
        pinned = dict(f)
        if got.get('sha256'):
            pinned['sha256'] = got['sha256']
            pinned.pop('git_blob', None)
        elif got.get('git_blob'):
            pinned['git_blob'] = got['git_blob']
            pinned.pop('sha256', None)
        if got.get('size') is not None:
            pinned['size'] = got['size']
        new = dict(m)
        new['files'] = dict(m['files'])
        new['files'][platform] = pinned
        out.append(new)
    return out


class FilterModule(object):
    def filters(self):
        return {
            'catalog_problems': catalog_problems,
            'environment_problems': environment_problems,
            'exec_args_problems': exec_args_problems,
            'systemd_env_value': systemd_env_value,
            'systemd_exec_arg': systemd_exec_arg,
            'installed_models': installed_models,
            'pin_catalog': pin_catalog,
        }
