#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: rkllm.fleet developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: model_check
short_description: Check that an rkllama model loads on the NPU and generates text
version_added: 1.0.0
description:
  - Talks to rkllama's HTTP API (the old routes of the C(jfreed-dev/rkllama) fork) to make sure that O(model) is loaded
    on the board's NPU and generates text, and measures the load time, the time to first token and the tokens per second.
  - If O(model) is already loaded it is not reloaded (C(changed=false)). If no model is loaded, O(model) is loaded
    and left loaded, ready to serve.
  - rkllama holds one model at a time. If another model holds the NPU, the module fails and names that model, leaving it
    loaded, unless O(replace=true).
  - Runs one streamed generation of O(prompt) and reads it to its end, whatever happens to it, because rkllama keeps
    generating for a client that stops reading and hands the rest of that text to the next request.
  - Every failure becomes one sentence saying what is wrong and where to look, for example an HTTP 500 on load, which means
    the RKLLM runtime could not initialise the model.
author:
  - rkllm.fleet developers (@rkllm)
extends_documentation_fragment: [ansible.builtin.action_common_attributes, rkllm.fleet.attributes]
attributes:
  check_mode:
    details:
      - Only the read-only C(GET /), C(GET /current_model) and, when a model would be loaded, C(GET /models) are sent.
        The module reports what it would do (load O(model), or replace the loaded model) without loading or generating.
  platform:
    details:
      - Runs wherever it can reach O(url). rkllama's port is open to the board itself only, so run it on the board.
options:
  url:
    description:
      - Base URL of rkllama's API.
    type: str
    default: http://127.0.0.1:8080
  model:
    description:
      - Name of the model as rkllama knows it, the name of its directory in C(~/RKLLAMA/models/), for example
        C(Qwen2.5-1.5B-Instruct).
    type: str
    required: true
  prompt:
    description:
      - The user message of the test generation. Keep it short, with a short answer; rkllama has no per-request
        token limit, so the answer runs until the model stops or reaches the Modelfile's C(MAX_NEW_TOKENS).
    type: str
    default: "Answer in one short sentence: what is the capital of France?"
  timeout:
    description:
      - Seconds the whole check may take, the model load and the generation included.
      - Reasoning models such as DeepSeek-R1 think for minutes before they answer; raise it for them.
    type: float
    default: 600
  min_tokens_per_second:
    description:
      - Fail when the generation runs slower than this many tokens per second.
      - Unset, speed is reported but not checked.
    type: float
  replace:
    description:
      - When another model holds the NPU, unload it and load O(model).
      - If O(model) then fails to load, the module loads the previous model again before it fails, so the board keeps
        serving it.
      - When V(false), the module fails in that case, names the model that holds the NPU and leaves it loaded.
    type: bool
    default: false
notes:
  - Proxy settings in the environment are ignored; rkllama is reached directly.
  - C(GET /models) makes rkllama move loose C(.rkllm) files in its models directory into directories of their own, as
    every listing does; the module asks for it only to name the models on the board when O(model) is not one of them.
  - If O(timeout) passes during the generation, the generation keeps running on the board until the model stops or reaches
    C(MAX_NEW_TOKENS), and its remaining text would go to the next request; the failure message says so.
  - Tokens per second is rkllama's own figure when its stream carries one, else it is computed from the chunks received
    after the first one. The fork sends one chunk per piece of text and none for hidden thinking tokens, so for reasoning
    models both figures count visible text only.
seealso:
  - module: rkllm.fleet.npu_facts
"""

EXAMPLES = r"""
- name: Check that the catalog's model loads and generates
  rkllm.fleet.model_check:
    model: Qwen2.5-1.5B-Instruct
  register: rkllama_model_check

- name: Require a speed floor, replacing whatever model is loaded
  rkllm.fleet.model_check:
    model: Qwen2.5-1.5B-Instruct
    replace: true
    min_tokens_per_second: 6.5

- name: Give a reasoning model the minutes it needs
  rkllm.fleet.model_check:
    model: DeepSeek-R1-1.5B
    prompt: What is 17 * 23?
    timeout: 900

- name: Report each board's speed
  ansible.builtin.debug:
    msg: >-
      {{ inventory_hostname }}: {{ rkllama_model_check.tokens_per_second }} tokens/s,
      first token after {{ rkllama_model_check.time_to_first_token }} s
"""

RETURN = r"""
msg:
  description: What the check did and measured, in one sentence.
  returned: always
  type: str
  sample: Loaded Qwen2.5-1.5B-Instruct in 11.8 s; first token after 0.42 s, 9 tokens at 7.93 tokens/s.
loaded:
  description:
    - Whether O(model) is loaded when the module ends.
    - In check mode, whether it is loaded now.
  returned: always
  type: bool
  sample: true
previously_loaded:
  description: The model that was loaded before the module ran; V(null) when none was, or when rkllama could not be asked.
  returned: always
  type: str
  sample: DeepSeek-R1-1.5B
load_seconds:
  description: Seconds the load of O(model) took; V(null) when the module did not load it.
  returned: always
  type: float
  sample: 11.84
time_to_first_token:
  description:
    - Seconds from sending the prompt to receiving the first text, measured by the module; it includes rkllama's
      tokenizer load and the prompt's prefill.
    - Text left in rkllama's buffer by an earlier answer (RV(stale_tokens)) arrives at once and is not counted as the
      first token.
    - V(null) when no generation ran (check mode) or no text came.
  returned: always
  type: float
  sample: 0.42
tokens_per_second:
  description:
    - Generation speed; rkllama's own figure when it sends one, else computed from the chunks after the first.
    - V(null) when no generation ran or it was too short to measure.
  returned: always
  type: float
  sample: 7.93
completion_tokens:
  description: Tokens generated, as rkllama counts them, less RV(stale_tokens); V(null) when no generation ran.
  returned: always
  type: int
  sample: 9
stale_tokens:
  description:
    - Tokens of an earlier answer that rkllama sent at the start of this one. The unpatched fork leaves the last token of
      an answer in its shared buffer and hands it to the next request (src/process.py:72-79, 102-126 at 1d8d210); they
      are recognised because the fork sent them before its read loop's first pass (C(tokens_per_second) still the
      integer 0), and left out of RV(response) and of every figure. Always 0 with the role's patches applied.
    - V(null) when no generation ran.
  returned: always
  type: int
  sample: 0
response:
  description: The generated text, shortened to 300 characters; V(null) when no generation ran.
  returned: always
  type: str
  sample: The capital of France is Paris.
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.rkllm.fleet.plugins.module_utils.rkllama_api import (
    QUICK_ANSWER_SECONDS,
    RkllamaClient,
    RkllamaError,
    RkllamaHTTPError,
    RkllamaProtocolError,
    RkllamaTimeout,
    RkllamaUnreachable,
)

DEFAULT_PROMPT = 'Answer in one short sentence: what is the capital of France?'
RESPONSE_MAX_CHARS = 300
LOG_HINT = 'journalctl -u rkllama'


class CheckFailed(Exception):
    """The check failed: ``msg`` says why in one sentence, ``result`` holds what is known."""

    def __init__(self, msg, result):
        super(CheckFailed, self).__init__(msg)
        self.msg = msg
        self.result = result


def new_result():
    return {
        'changed': False,
        'loaded': False,
        'previously_loaded': None,
        'load_seconds': None,
        'time_to_first_token': None,
        'tokens_per_second': None,
        'completion_tokens': None,
        'stale_tokens': None,
        'response': None,
    }


def shorten(text, limit=RESPONSE_MAX_CHARS):
    text = (text or '').strip()
    if len(text) <= limit:
        return text
    return text[:limit - 3].rstrip() + '...'


def _fmt(value):
    """Seconds and rates for messages: 3 significant digits, whole numbers from 100 on."""
    if value is None:
        return '?'
    if abs(value) >= 100:
        return '%d' % round(value)
    return '%.3g' % value


def _models_sentence(client):
    """' (GET /models lists: a, b)', or '' when that request fails too."""
    try:
        models = client.list_models()
    except RkllamaError:
        return ''
    if not models:
        return ' (GET /models lists none)'
    return ' (GET /models lists: %s)' % ', '.join(models)


def describe_lost_server(client, exc, doing):
    """One sentence for a transport failure or an answer that is not rkllama's, during ``doing``."""
    if isinstance(exc, RkllamaUnreachable):
        return ('rkllama stopped answering at %s while %s (%s): it may have crashed; see %s.'
                % (client.url, doing, exc.reason, LOG_HINT))
    if isinstance(exc, RkllamaProtocolError):
        return ('The answer from %s while %s is not what rkllama sends (%s): check that url points at rkllama.'
                % (client.url, doing, exc.message))
    if isinstance(exc, RkllamaTimeout):
        return ('rkllama at %s gave no answer within %s s while %s: it may be busy or hung; see %s.'
                % (client.url, _fmt(min(QUICK_ANSWER_SECONDS, client.timeout)), doing, LOG_HINT))
    status = getattr(exc, 'status', None)
    if status in (404, 405):
        return ('%s has no route %s (HTTP %s): check that url points at rkllama (the jfreed-dev fork, port 8080 by default).'
                % (client.url, exc.path, status))
    return 'rkllama at %s failed while %s: %s; see %s.' % (client.url, doing, exc.message, LOG_HINT)


def describe_unreachable(client, exc):
    """rkllama does not answer at all (first request)."""
    if isinstance(exc, RkllamaUnreachable):
        return ('rkllama is not answering at %s (%s): is rkllama.service running? See systemctl status rkllama and %s.'
                % (client.url, exc.reason, LOG_HINT))
    if isinstance(exc, RkllamaHTTPError):
        return ('Something answers at %s but GET / returned HTTP %s instead of rkllama\'s greeting: check that url points '
                'at rkllama (port 8080 by default).' % (client.url, exc.status))
    return describe_lost_server(client, exc, 'checking its health (GET /)')


def describe_load_failure(client, model, exc):
    """One sentence for a failed POST /load_model."""
    if isinstance(exc, RkllamaTimeout):
        return ('%s did not finish loading within the %s s timeout: rkllama may still be initialising it (large models '
                'take minutes; see %s); raise timeout.' % (model, _fmt(client.timeout), LOG_HINT))
    if not isinstance(exc, RkllamaHTTPError):
        return describe_lost_server(client, exc, 'loading %s' % model)
    error = exc.error or ''
    lowered = error.lower()
    if exc.status == 400 and 'modelfile not found' in lowered:
        return ('Model %s has no Modelfile: put one with FROM="<file>.rkllm" and HUGGINGFACE_PATH="<org>/<repo>" lines '
                'in ~/RKLLAMA/models/%s/.' % (model, model))
    if exc.status == 400 and 'directory' in lowered and 'not found' in lowered:
        return ('Model %s is not on the board: rkllama has no directory ~/RKLLAMA/models/%s%s; check the name or put the '
                'model on the board (the rkllama role installs its model catalog).' % (model, model, _models_sentence(client)))
    if exc.status == 400 and ('from' in lowered and 'huggingface_path' in lowered):
        return ('The Modelfile of %s lacks FROM or HUGGINGFACE_PATH: it is read with python-dotenv, so each line must be '
                'KEY="value" (rkllama said: %s).' % (model, error))
    if exc.status == 500:
        return ('rkllama failed to initialise %s (HTTP 500 on /load_model): the RKLLM runtime rejected the model, because it '
                'was converted for another platform, with a toolkit newer than the runtime, the .rkllm file is corrupt, or '
                'the NPU is out of memory; the "E rkllm:" line in %s says which.' % (model, LOG_HINT))
    if exc.status in (404, 405):
        return describe_lost_server(client, exc, 'loading %s' % model)
    return 'rkllama refused to load %s (HTTP %s): %s.' % (model, exc.status, (error or exc.body.strip()[:200]).rstrip('.'))


def describe_generate_failure(client, model, exc):
    """One sentence for a failed POST /generate (timeouts are handled by the caller)."""
    if isinstance(exc, RkllamaHTTPError):
        error = exc.error or ''
        if exc.status == 400 and 'no model' in error.lower():
            return ('%s was unloaded by another client before the test generation ran: run the check again once the '
                    'board is idle.' % model)
        if exc.status >= 500:
            return ('rkllama failed while generating with %s (HTTP %s on /generate): most often the tokenizer named by the '
                    'Modelfile\'s HUGGINGFACE_PATH is missing from the rkllama user\'s Hugging Face cache '
                    '(~/.cache/huggingface/hub) while HF_HUB_OFFLINE=1; the traceback is in %s.'
                    % (model, exc.status, LOG_HINT))
        if exc.status == 400:
            return 'rkllama rejected the test generation with %s (HTTP 400): %s.' % (model, (error or exc.body.strip()[:200]).rstrip('.'))
    return describe_lost_server(client, exc, 'generating with %s' % model)


def _put_back(client, previous, result):
    """After ``replace`` unloaded ``previous`` and the new model failed: load ``previous`` again."""
    client.restart_clock()
    try:
        client.load_model(previous)
    except RkllamaError as exc:
        return '; loading %s back failed too (%s), so no model is loaded now' % (previous, exc.message)
    result['changed'] = True
    return '; %s was loaded back, so the board serves it as before' % previous


def _load(client, model, current, result):
    """Load ``model`` (after unloading ``current`` if set). Fills ``result``; raises CheckFailed."""
    if current:
        try:
            client.unload_model()
        except RkllamaHTTPError as exc:
            # 400: nothing loaded any more (another client unloaded it meanwhile): nothing to do.
            if exc.status != 400:
                raise CheckFailed(describe_lost_server(client, exc, 'unloading %s' % current), result)
        except RkllamaError as exc:
            raise CheckFailed(describe_lost_server(client, exc, 'unloading %s' % current), result)
        result['changed'] = True
    try:
        result['load_seconds'] = round(client.load_model(model), 2)
    except RkllamaHTTPError as exc:
        if exc.status == 400 and 'already loaded' in (exc.error or '').lower():
            # Another client loaded a model between our GET /current_model and the load.
            try:
                holder = client.current_model()
            except RkllamaError as again:
                raise CheckFailed(describe_lost_server(client, again, 'asking which model is loaded'), result)
            if holder == model:
                result['loaded'] = True
                return
            raise CheckFailed('Another client loaded %s while this check was about to load %s; rkllama runs one model at a '
                              'time, so the check left it alone: run it again when the board is idle.' % (holder, model), result)
        message = describe_load_failure(client, model, exc)
        if current:
            message = message.rstrip('.') + _put_back(client, current, result) + '.'
        raise CheckFailed(message, result)
    except RkllamaError as exc:
        raise CheckFailed(describe_load_failure(client, model, exc), result)
    result['changed'] = True
    result['loaded'] = True


def _generate(client, model, prompt, result):
    """Run the test generation to its end; fill the figures into ``result``; return the summary tail."""
    try:
        generation = client.generate([{'role': 'user', 'content': prompt}])
    except RkllamaTimeout as exc:
        partial = exc.partial
        so_far = ''
        if partial is not None:
            result.update(partial.figures())
            result['response'] = shorten(partial.text)
            so_far = ' (%d tokens so far, first token after %s s)' % (partial.completion_tokens, _fmt(partial.first_token_at))
        raise CheckFailed('%s did not finish answering within the %s s timeout%s: the generation keeps running on the board '
                          'until it ends or reaches MAX_NEW_TOKENS and its text would go to the next request, so wait for it '
                          'or restart rkllama.service; raise timeout for reasoning models.'
                          % (model, _fmt(client.timeout), so_far), result)
    except RkllamaError as exc:
        raise CheckFailed(describe_generate_failure(client, model, exc), result)
    result.update(generation.figures())
    result['response'] = shorten(generation.text)
    if not generation.text.strip():
        raise CheckFailed('%s is loaded but its answer held no text (%d stream chunks in %s s): the runtime likely failed '
                          'during inference; look for "E rkllm:" lines in %s.'
                          % (model, generation.chunks, _fmt(generation.elapsed), LOG_HINT), result)
    tail = 'first token after %s s, %s tokens at %s tokens/s' % (
        _fmt(result['time_to_first_token']), result['completion_tokens'], _fmt(result['tokens_per_second']))
    if generation.stale_pieces:
        tail += (' (not counting %d token(s) of an earlier answer, %r, that rkllama sent first: its read loop leaves them '
                 'behind; the rkllama role\'s patches fix that)' % (len(generation.stale_pieces), generation.stale_text[:40]))
    return tail


def check_speed(model, result, min_tokens_per_second):
    """Raise CheckFailed when the measured speed is below the floor (or could not be measured)."""
    if min_tokens_per_second is None:
        return
    rate = result['tokens_per_second']
    if rate is None:
        raise CheckFailed('%s generated %s token(s), too few to measure tokens/s against min_tokens_per_second %s: use a '
                          'prompt that asks for a longer answer.' % (model, result['completion_tokens'], _fmt(min_tokens_per_second)), result)
    if rate < min_tokens_per_second:
        raise CheckFailed('%s generated %s tokens at %s tokens/s, below min_tokens_per_second %s (first token after %s s): look '
                          'for other load on the NPU, a lowered NPU frequency or governor, or thermal throttling.'
                          % (model, result['completion_tokens'], _fmt(rate), _fmt(min_tokens_per_second),
                             _fmt(result['time_to_first_token'])), result)


def check_model(client, model, prompt=DEFAULT_PROMPT, replace=False, min_tokens_per_second=None, check_mode=False):
    """Run the whole check against ``client``. Returns the result dict or raises CheckFailed."""
    result = new_result()
    try:
        client.health()
    except RkllamaError as exc:
        raise CheckFailed(describe_unreachable(client, exc), result)
    try:
        current = client.current_model()
    except RkllamaError as exc:
        raise CheckFailed(describe_lost_server(client, exc, 'asking which model is loaded'), result)
    result['previously_loaded'] = current

    if current is not None and current != model and not replace:
        raise CheckFailed('The NPU holds %s, not %s; rkllama runs one model at a time, so the check left %s loaded: set replace '
                          'to true to unload it and load %s.' % (current, model, current, model), result)

    if current == model:
        result['loaded'] = True
        if check_mode:
            result['msg'] = '%s is loaded; a real run would test its generation.' % model
            return result
        done = '%s was already loaded' % model
    elif check_mode:
        try:
            available = client.list_models()
        except RkllamaError as exc:
            raise CheckFailed(describe_lost_server(client, exc, 'listing its models'), result)
        if model not in available:
            raise CheckFailed('Model %s is not on the board: rkllama has no directory ~/RKLLAMA/models/%s (GET /models lists: %s); '
                              'check the name or put the model on the board (the rkllama role installs its model catalog).'
                              % (model, model, ', '.join(available) or 'none'), result)
        result['changed'] = True
        if current:
            result['msg'] = 'Would unload %s and load %s, then test its generation.' % (current, model)
        else:
            result['msg'] = 'Would load %s, then test its generation.' % model
        return result
    else:
        _load(client, model, current, result)
        if result['load_seconds'] is None:
            done = '%s was loaded by another client meanwhile' % model
        elif current:
            done = 'Unloaded %s and loaded %s in %s s' % (current, model, _fmt(result['load_seconds']))
        else:
            done = 'Loaded %s in %s s' % (model, _fmt(result['load_seconds']))

    figures = _generate(client, model, prompt, result)
    check_speed(model, result, min_tokens_per_second)
    result['msg'] = '%s; %s.' % (done, figures)
    return result


def main():
    module = AnsibleModule(
        argument_spec=dict(
            url=dict(type='str', default='http://127.0.0.1:8080'),
            model=dict(type='str', required=True),
            prompt=dict(type='str', default=DEFAULT_PROMPT),
            timeout=dict(type='float', default=600.0),
            # A speed floor, not a secret: tells validate-modules the 'token' in its name is no credential.
            min_tokens_per_second=dict(type='float', no_log=False),
            replace=dict(type='bool', default=False),
        ),
        supports_check_mode=True,
    )
    params = module.params
    if not params['url'].startswith(('http://', 'https://')):
        module.fail_json(msg='url must start with http:// or https://, for example http://127.0.0.1:8080; got %r.' % params['url'],
                         **new_result())
    if params['timeout'] <= 0:
        module.fail_json(msg='timeout must be a positive number of seconds; got %s.' % params['timeout'], **new_result())
    if not params['model'].strip():
        module.fail_json(msg='model must name a model directory of rkllama, for example Qwen2.5-1.5B-Instruct.', **new_result())

    client = RkllamaClient(params['url'], params['timeout'])
    try:
        result = check_model(client, params['model'], prompt=params['prompt'], replace=params['replace'],
                             min_tokens_per_second=params['min_tokens_per_second'], check_mode=module.check_mode)
    except CheckFailed as failure:
        module.fail_json(msg=failure.msg, **failure.result)
    module.exit_json(**result)


if __name__ == '__main__':
    main()
