# -*- coding: utf-8 -*-
# Copyright: rkllm.fleet developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Tests for plugins/module_utils/rkllama_api.py against a fake of rkllama's old API.

``FakeRkllama`` (also used by the model_check tests) answers like the jfreed-dev fork's
server.py / src/process.py at commit 1d8d210: the same routes, status codes, JSON error
strings, Flask's HTML page for an unhandled exception, and the token stream (one JSON object
per token followed by a blank line, usage in every object; tokens_per_second is the integer 0
only in chunks sent before the read loop's first pass, i.e. ``stale`` tokens an earlier answer left
in the fork's buffer, and a float from then on, 0.0 in the first real chunk). It also records whether each stream was read to its end: after the last byte
it half-closes the connection and waits for the client's close. A client that closes with
unread bytes makes the kernel send a reset instead of a clean close, and a client that
closes before the end makes the server's writes fail.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ansible_collections.rkllm.fleet.plugins.module_utils.rkllama_api import (
    Generation,
    RkllamaClient,
    RkllamaHTTPError,
    RkllamaProtocolError,
    RkllamaTimeout,
    RkllamaUnreachable,
)

QWEN = 'Qwen2.5-1.5B-Instruct'
DEEPSEEK = 'DeepSeek-R1-1.5B'

# Flask 2.3's page for an unhandled exception (what the fork answers when rkllm_init fails).
FLASK_500 = (
    b'<!doctype html>\n<html lang=en>\n<title>500 Internal Server Error</title>\n'
    b'<h1>Internal Server Error</h1>\n<p>The server encountered an internal error and was unable to '
    b'complete your request. Either the server is overloaded or there is an error in the application.</p>\n'
)


class FakeRkllama(object):
    """Configurable stand-in for the fork's API; attributes may be changed by each test."""

    def __init__(self):
        # name -> how POST /load_model goes: ok, no-modelfile, bad-modelfile, init-fails
        self.models = {QWEN: 'ok', DEEPSEEK: 'ok'}
        self.current = None
        self.load_seconds = 0.0
        self.tokens = ['The', ' capital', ' of', ' France', ' is', ' Paris', '.']
        self.first_token_delay = 0.0
        # Tokens an earlier answer left in the fork's shared buffer: sent at once, before the prefill.
        self.stale = []
        self.token_delay = 0.005
        # None: tokens_per_second computed as the fork does; 0: never sent; a number: sent as is.
        self.reported_tps = None
        self.chunked = True
        self.split_writes = False
        self.malformed_line_at = None
        self.crash_after = None
        self.generate_error = None
        # Another program on the port: 'page' answers 200 with HTML, '404' answers 404 with HTML.
        self.not_rkllama = None
        # Another client loads this model at the moment our /load_model arrives.
        self.race_loads = None

        self.requests = []
        self.streams = []
        self._cond = threading.Condition()
        self._server = None
        self._thread = None

    # -- lifecycle ---------------------------------------------------------

    def start(self):
        fake = self

        class Handler(FakeHandler):
            server_fake = fake

        self._server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={'poll_interval': 0.05})
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self):
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self):
        return 'http://127.0.0.1:%d' % self._server.server_address[1]

    # -- what tests look at -----------------------------------------------

    def posts(self):
        return [path for method, path, _body in self.requests if method == 'POST']

    def record_stream(self, outcome):
        with self._cond:
            self.streams.append(outcome)
            self._cond.notify_all()

    def wait_streams(self, count, timeout=5.0):
        """The outcome of the first ``count`` streams, once the server knows how each ended."""
        with self._cond:
            self._cond.wait_for(lambda: len(self.streams) >= count, timeout)
            return list(self.streams)


class FakeHandler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    server_fake = None

    def log_message(self, *args):  # keep test output clean
        pass

    # -- helpers -----------------------------------------------------------

    def _body(self):
        length = int(self.headers.get('Content-Length') or 0)
        raw = self.rfile.read(length) if length else b''
        try:
            return json.loads(raw.decode('utf-8')) if raw else None
        except ValueError:
            return None

    def _send(self, status, body, content_type='application/json'):
        data = json.dumps(body).encode('utf-8') if content_type == 'application/json' else body
        self.send_response(status)
        self.send_header('Content-Type', content_type)
        self.send_header('Content-Length', str(len(data)))
        self.send_header('Connection', 'close')
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True

    def _html500(self):
        self._send(500, FLASK_500, 'text/html; charset=utf-8')

    # -- routes --------------------------------------------------------------

    def do_GET(self):
        fake = self.server_fake
        fake.requests.append(('GET', self.path, None))
        if fake.not_rkllama == 'page':
            self._send(200, b'<html><body>Hello</body></html>', 'text/html')
        elif fake.not_rkllama:
            self._send(404, b'<html><body>Not Found</body></html>', 'text/html')
        elif self.path == '/':
            self._send(200, {'message': 'Welcome to RKLLama !', 'github': 'https://github.com/notpunhnox/rkllama'})
        elif self.path == '/current_model':
            if fake.current:
                self._send(200, {'model_name': fake.current})
            else:
                self._send(404, {'error': 'No models are currently loaded.'})
        elif self.path == '/models':
            self._send(200, {'models': sorted(fake.models)})
        else:
            self._send(404, b'<!doctype html>\n<title>404 Not Found</title>\n', 'text/html; charset=utf-8')

    def do_POST(self):
        fake = self.server_fake
        body = self._body()
        fake.requests.append(('POST', self.path, body))
        if fake.not_rkllama:
            self._send(404, b'<html><body>Not Found</body></html>', 'text/html')
        elif self.path == '/load_model':
            self._load(fake, body or {})
        elif self.path == '/unload_model':
            if not fake.current:
                self._send(400, {'error': 'No models are currently loaded.'})
            else:
                fake.current = None
                self._send(200, {'message': 'Model successfully unloaded!'})
        elif self.path == '/generate':
            if not fake.current:
                self._send(400, {'error': 'No models are currently loaded.'})
            elif fake.generate_error == 'html500':
                self._html500()
            elif not isinstance(body, dict) or 'messages' not in body:
                self._send(400, {'status': 'error', 'message': 'Données JSON invalides !'})
            else:
                self._stream(fake)
        else:
            self._send(404, b'<!doctype html>\n<title>404 Not Found</title>\n', 'text/html; charset=utf-8')

    def _load(self, fake, body):
        if fake.race_loads:
            fake.current, fake.race_loads = fake.race_loads, None
        if fake.current:
            return self._send(400, {'error': 'A model is already loaded. Please unload it first.'})
        name = body.get('model_name')
        if not name:
            return self._send(400, {'error': 'Please enter the name of the model to be loaded.'})
        kind = fake.models.get(name)
        if kind is None:
            return self._send(400, {'error': "Model directory '%s' not found." % name})
        if kind == 'no-modelfile':
            return self._send(400, {'error': "Modelfile not found in '%s' directory." % name})
        if kind == 'bad-modelfile':
            return self._send(400, {'error': 'FROM or HUGGINGFACE_PATH not defined in Modelfile.'})
        time.sleep(fake.load_seconds)
        if kind == 'init-fails':
            return self._html500()
        fake.current = name
        return self._send(200, {'message': 'Model %s loaded successfully.' % name})

    def _write(self, data):
        fake = self.server_fake
        if fake.chunked:
            data = b'%x\r\n%s\r\n' % (len(data), data)
        if fake.split_writes and len(data) > 4:
            self.wfile.write(data[:3])
            self.wfile.flush()
            time.sleep(0.002)
            data = data[3:]
        self.wfile.write(data)
        self.wfile.flush()

    def _stream(self, fake):
        self.close_connection = True
        self.send_response(200)
        self.send_header('Content-Type', 'text/plain; charset=utf-8')
        if fake.chunked:
            self.send_header('Transfer-Encoding', 'chunked')
        self.send_header('Connection', 'close')
        self.end_headers()
        outcome = {'sent_all': False, 'read_to_end': False, 'tokens_sent': 0}
        answer = {'id': 'rkllm_chat', 'object': 'rkllm_chat', 'created': None, 'choices': [],
                  'usage': {'prompt_tokens': 21, 'completion_tokens': 0, 'tokens_per_second': 0, 'total_tokens': 21}}
        start = time.time()
        try:
            for count, token in enumerate(fake.stale, 1):
                answer['choices'] = [{'role': 'assistant', 'content': token, 'logprobs': None, 'finish_reason': None}]
                answer['usage']['completion_tokens'] = count
                answer['usage']['total_tokens'] += 1
                self._write(('%s\n\n' % json.dumps(answer)).encode('utf-8'))
            time.sleep(fake.first_token_delay)
            for count, token in enumerate(fake.tokens, len(fake.stale) + 1):
                if count > len(fake.stale) + 1:
                    time.sleep(fake.token_delay)
                if fake.crash_after is not None and count > fake.crash_after:
                    # The process dies: the connection drops without the stream's end.
                    self.connection.shutdown(socket.SHUT_RDWR)
                    fake.record_stream(outcome)
                    return
                answer['choices'] = [{'role': 'assistant', 'content': token, 'logprobs': None,
                                      'finish_reason': None}]
                answer['usage']['completion_tokens'] = count
                answer['usage']['total_tokens'] += 1
                if fake.reported_tps is None:
                    # The fork's rate, count / elapsed, from its last pass before this chunk (a float).
                    answer['usage']['tokens_per_second'] = (count - 1) / (time.time() - start)
                else:
                    answer['usage']['tokens_per_second'] = fake.reported_tps
                self._write(('%s\n\n' % json.dumps(answer)).encode('utf-8'))
                outcome['tokens_sent'] = count
                if fake.malformed_line_at == count:
                    self._write(b'Traceback (most recent call last): oops\n\n')
            if fake.chunked:
                self.wfile.write(b'0\r\n\r\n')
                self.wfile.flush()
            outcome['sent_all'] = True
            # Half-close, then wait for the client's close: a clean one (FIN, recv gives b'')
            # means it read every byte; unread bytes make its kernel answer with a reset.
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(5)
            try:
                outcome['read_to_end'] = self.connection.recv(1) == b''
            except OSError:
                outcome['read_to_end'] = False
        except OSError:
            pass
        fake.record_stream(outcome)


@pytest.fixture
def fake():
    server = FakeRkllama().start()
    yield server
    server.stop()


def free_port():
    sock = socket.socket()
    sock.bind(('127.0.0.1', 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


MESSAGES = [{'role': 'user', 'content': 'What is the capital of France?'}]


# -- the fake itself: its read-to-end detector must be able to fail -----------------------------


def test_fake_detects_a_client_that_stops_reading_early(fake):
    fake.current = QWEN
    fake.tokens = ['tok'] * 40
    fake.token_delay = 0.002
    request = urllib.request.Request(fake.url + '/generate', data=json.dumps({'messages': MESSAGES, 'stream': True}).encode(),
                                     headers={'Content-Type': 'application/json'}, method='POST')
    response = urllib.request.urlopen(request, timeout=5)
    response.readline()
    response.close()
    assert fake.wait_streams(1)[0]['read_to_end'] is False


# -- streamed generation -------------------------------------------------------------------


@pytest.mark.parametrize('chunked', [True, False], ids=['chunked', 'close-delimited'])
def test_generate_reads_the_whole_stream(fake, chunked):
    fake.current = QWEN
    fake.chunked = chunked
    fake.split_writes = True
    generation = RkllamaClient(fake.url, 10).generate(MESSAGES)
    assert generation.text == 'The capital of France is Paris.'
    assert generation.chunks == 7
    assert generation.completion_tokens == 7
    assert generation.complete
    assert fake.wait_streams(1)[0] == {'sent_all': True, 'read_to_end': True, 'tokens_sent': 7}
    assert fake.requests[-1][2] == {'messages': MESSAGES, 'stream': True}


def test_generate_measures_time_to_first_token_on_the_client(fake):
    fake.current = QWEN
    fake.first_token_delay = 0.3
    generation = RkllamaClient(fake.url, 10).generate(MESSAGES)
    assert 0.3 <= generation.first_token_at < 1.5
    assert generation.last_token_at >= generation.first_token_at


def test_generate_prefers_the_servers_tokens_per_second(fake):
    fake.current = QWEN
    fake.reported_tps = 7.9
    assert RkllamaClient(fake.url, 10).generate(MESSAGES).tokens_per_second == 7.9


def test_generate_computes_tokens_per_second_when_the_server_sends_none(fake):
    fake.current = QWEN
    fake.reported_tps = 0
    fake.token_delay = 0.04
    rate = RkllamaClient(fake.url, 10).generate(MESSAGES).tokens_per_second
    # 6 intervals of at least 40 ms: never faster than 25 tokens/s, and not absurdly slow.
    assert 5 < rate <= 25.5


def test_generate_keeps_reading_past_a_line_that_is_not_json(fake):
    fake.current = QWEN
    fake.malformed_line_at = 2
    generation = RkllamaClient(fake.url, 10).generate(MESSAGES)
    assert generation.malformed == 1
    assert generation.text == 'The capital of France is Paris.'
    assert fake.wait_streams(1)[0]['read_to_end'] is True


def test_generate_timeout_carries_what_was_read(fake):
    fake.current = QWEN
    fake.tokens = ['tok'] * 50
    fake.token_delay = 0.1
    client = RkllamaClient(fake.url, 0.5)
    with pytest.raises(RkllamaTimeout) as info:
        client.generate(MESSAGES)
    partial = info.value.partial
    assert partial is not None and 1 <= partial.chunks < 50
    assert partial.complete is False
    assert partial.text.startswith('tok')


def test_generate_server_crash_mid_stream_is_unreachable(fake):
    fake.current = QWEN
    fake.crash_after = 3
    with pytest.raises(RkllamaUnreachable):
        RkllamaClient(fake.url, 10).generate(MESSAGES)


def test_generate_without_model_is_a_400_with_the_forks_error(fake):
    with pytest.raises(RkllamaHTTPError) as info:
        RkllamaClient(fake.url, 10).generate(MESSAGES)
    assert info.value.status == 400
    assert info.value.error == 'No models are currently loaded.'


# -- other routes ----------------------------------------------------------------------------


def test_current_model_none_and_loaded(fake):
    client = RkllamaClient(fake.url, 10)
    assert client.current_model() is None
    fake.current = DEEPSEEK
    assert client.current_model() == DEEPSEEK


def test_load_model_html_500_is_flagged_as_html(fake):
    fake.models['Broken'] = 'init-fails'
    with pytest.raises(RkllamaHTTPError) as info:
        RkllamaClient(fake.url, 10).load_model('Broken')
    assert info.value.status == 500
    assert info.value.html is True
    assert info.value.error is None
    assert fake.current is None


def test_load_model_400_carries_the_error_string(fake):
    with pytest.raises(RkllamaHTTPError) as info:
        RkllamaClient(fake.url, 10).load_model('Nope')
    assert info.value.status == 400
    assert info.value.error == "Model directory 'Nope' not found."


def test_load_and_unload_round_trip(fake):
    fake.load_seconds = 0.2
    client = RkllamaClient(fake.url, 10)
    seconds = client.load_model(QWEN)
    assert seconds >= 0.2
    assert fake.current == QWEN
    client.unload_model()
    assert fake.current is None
    assert client.sent == [('POST', '/load_model'), ('POST', '/unload_model')]


def test_list_models(fake):
    assert RkllamaClient(fake.url, 10).list_models() == sorted([QWEN, DEEPSEEK])


def test_load_timeout(fake):
    fake.load_seconds = 2
    with pytest.raises(RkllamaTimeout):
        RkllamaClient(fake.url, 0.3).load_model(QWEN)


def test_connection_refused_is_unreachable():
    with pytest.raises(RkllamaUnreachable) as info:
        RkllamaClient('http://127.0.0.1:%d' % free_port(), 5).health()
    assert 'refused' in info.value.reason.lower()


def test_a_non_json_answer_is_a_protocol_error(fake):
    fake.not_rkllama = 'page'
    with pytest.raises(RkllamaProtocolError):
        RkllamaClient(fake.url, 5).health()


def test_a_404_html_page_is_not_mistaken_for_no_model_loaded(fake):
    fake.not_rkllama = '404'
    with pytest.raises(RkllamaHTTPError) as info:
        RkllamaClient(fake.url, 5).current_model()
    assert info.value.status == 404 and info.value.html


# -- pure logic --------------------------------------------------------------------------------


def test_deadline_is_shared_by_all_calls():
    now = [100.0]
    client = RkllamaClient('http://127.0.0.1:1', 10, clock=lambda: now[0])
    assert client.remaining() == 10
    now[0] = 106.0
    assert client.remaining() == 4
    now[0] = 110.5
    with pytest.raises(RkllamaTimeout):
        client.remaining('/generate')
    client.restart_clock()
    assert client.remaining() == 10


def _chunk(content, tps=0.0, completion=None):
    usage = {'tokens_per_second': tps}
    if completion is not None:
        usage['completion_tokens'] = completion
    return {'choices': [{'content': content, 'finish_reason': None}], 'usage': usage}


def test_generation_rate_from_chunks_after_the_first():
    generation = Generation()
    for index, at in enumerate([2.0, 2.5, 3.0, 3.5, 4.0]):
        generation.add(_chunk('x'), at)
        assert generation.chunks == index + 1
    assert generation.first_token_at == 2.0
    assert generation.tokens_per_second == pytest.approx(2.0)
    assert generation.completion_tokens == 5


def test_generation_uses_the_servers_figures_when_given():
    generation = Generation()
    generation.add(_chunk('a', tps=0.0, completion=1), 0.5)
    generation.add(_chunk('b', tps=6.25, completion=2), 0.6)
    assert generation.tokens_per_second == 6.25
    assert generation.figures() == {'time_to_first_token': 0.5, 'tokens_per_second': 6.25, 'completion_tokens': 2,
                                    'stale_tokens': 0}


def test_generation_of_one_token_has_no_rate():
    generation = Generation()
    generation.add(_chunk('a'), 0.5)
    assert generation.tokens_per_second is None


def test_generation_ignores_objects_without_choices():
    generation = Generation()
    generation.add({'error': 'x'}, 0.1)
    generation.add(_chunk(''), 0.2)
    assert generation.chunks == 1
    assert generation.malformed == 1
    assert generation.first_token_at is None


# -- leftovers of an earlier answer (the unpatched fork's shared buffer) --------------------------


def test_generation_sets_apart_leftovers_sent_before_the_first_pass():
    generation = Generation()
    # The fork sends what was already in its buffer at once, with tokens_per_second still the integer 0 ...
    generation.add(_chunk(' Done.', tps=0, completion=1), 0.004)
    # ... and its own tokens after the prefill, the rate a float from the first pass on.
    for index, at in enumerate([0.3, 0.4, 0.5, 0.6, 0.7]):
        generation.add(_chunk('x', tps=(index + 1) / at, completion=index + 2), at)
    generation.settle()
    assert generation.stale_text == ' Done.' and generation.stale_at == 0.004
    assert generation.text == 'xxxxx'
    assert generation.first_token_at == 0.3
    assert generation.completion_tokens == 5
    assert generation.tokens_per_second == pytest.approx(10.0)  # 4 intervals of 0.1 s, the leftover's instant not counted
    assert generation.figures()['stale_tokens'] == 1


def test_generation_of_a_server_that_never_sends_a_rate_keeps_every_chunk():
    generation = Generation()
    for at in (0.2, 0.3, 0.4):
        generation.add(_chunk('y', tps=0), at)
    figures = generation.figures()
    assert generation.text == 'yyy' and generation.stale_pieces == []
    assert figures['time_to_first_token'] == 0.2 and figures['stale_tokens'] == 0


def test_generate_does_not_take_a_leftover_token_for_the_first_one(fake):
    fake.current = QWEN
    fake.stale = [' Done.']
    fake.first_token_delay = 0.3
    generation = RkllamaClient(fake.url, 10).generate(MESSAGES)
    assert generation.stale_text == ' Done.' and generation.stale_at < 0.2
    assert 0.3 <= generation.first_token_at < 1.5
    assert generation.text == 'The capital of France is Paris.'
    assert generation.completion_tokens == 7
