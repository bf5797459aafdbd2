# -*- coding: utf-8 -*-
# Copyright: rkllm.fleet developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""HTTP client for rkllama's old API, as served by the jfreed-dev/rkllama fork.

Routes used: ``GET /``, ``GET /current_model``, ``GET /models``, ``POST /load_model``,
``POST /unload_model`` and ``POST /generate`` with ``"stream": true``.

Every answer is read to its end. That matters most for ``/generate``: the fork runs the
generation in a thread that keeps going when a client stops reading, and the tokens it
still produces are handed to whichever request comes next. There is no per-request token
limit either (generation runs to the Modelfile's ``MAX_NEW_TOKENS``), so a caller can only
bound the wait, never the work.

All timing uses one deadline per client (``timeout`` seconds from its creation or from
``restart_clock()``): every socket operation waits at most for what is left of it.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
import urllib.error

from ansible.module_utils.urls import Request, make_context

USER_AGENT = 'rkllm.fleet-model_check'

# GET routes answer at once on a healthy server (Flask runs threaded, even during a load).
QUICK_ANSWER_SECONDS = 30.0

# Answers other than a token stream are small JSON documents or Flask's error page.
_MAX_BODY = 1024 * 1024


class RkllamaError(Exception):
    """Base class: something went wrong talking to rkllama."""

    def __init__(self, message, path=None):
        super(RkllamaError, self).__init__(message)
        self.message = message
        self.path = path


class RkllamaUnreachable(RkllamaError):
    """No HTTP answer: connection refused, name not resolved, connection reset mid-answer."""

    def __init__(self, message, path=None, reason=None):
        super(RkllamaUnreachable, self).__init__(message, path)
        self.reason = reason


class RkllamaTimeout(RkllamaError):
    """The deadline passed before the answer was complete."""

    def __init__(self, message, path=None, partial=None):
        super(RkllamaTimeout, self).__init__(message, path)
        # For /generate: the Generation read so far.
        self.partial = partial


class RkllamaHTTPError(RkllamaError):
    """rkllama answered with an HTTP error status."""

    def __init__(self, message, path=None, status=None, error=None, html=False, body=''):
        super(RkllamaHTTPError, self).__init__(message, path)
        self.status = status
        # The ``error`` string of the fork's JSON error answers, if the answer was one.
        self.error = error
        # Flask's HTML error page: what an unhandled exception in the server produces.
        self.html = html
        self.body = body


class RkllamaProtocolError(RkllamaError):
    """An answer that is not what rkllama's API sends (another program on that port?)."""


def is_timeout(exc):
    """True when ``exc`` (or the reason it wraps) is a socket timeout."""
    reason = getattr(exc, 'reason', exc)
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return True
    return 'timed out' in str(reason).lower()


def looks_like_html(body, content_type=''):
    """True for an HTML page (Flask's error page starts with ``<!doctype html>``)."""
    if 'html' in (content_type or '').lower():
        return True
    head = (body or '').lstrip()[:64].lower()
    return head.startswith('<!doctype html') or head.startswith('<html')


def make_opener(url):
    """A function ``(method, url, data, headers, timeout) -> response`` for ``url``'s scheme.

    One ansible ``Request`` (what ``open_url`` uses) with its TLS context built once: building
    it per request loads the CA bundle every time, which costs more than a local API call.
    Proxies are never used (rkllama is on the board) and no .netrc is read.
    """
    if url.startswith('https://'):
        context = make_context()
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    options = dict(use_proxy=False, http_agent=USER_AGENT, follow_redirects='none', use_netrc=False)
    try:
        request = Request(context=context, **options)
    except TypeError:  # ansible-core without the context option
        request = Request(**options)

    def opener(method, target, data, headers, timeout):
        return request.open(method, target, data=data, headers=headers, timeout=timeout)

    return opener


def _set_read_timeout(response, seconds):
    """Make the next reads on ``response``'s socket wait at most ``seconds``.

    ``open_url`` sets the socket timeout once, at connect time; a streamed answer needs it
    to shrink as the deadline approaches. Best effort: unknown response types keep theirs.
    """
    fp = getattr(response, 'fp', None)
    raw = getattr(fp, 'raw', None)
    sock = getattr(raw, '_sock', None)
    if sock is not None:
        try:
            sock.settimeout(max(seconds, 0.001))
        except (OSError, ValueError):
            pass


def _decode(body):
    if isinstance(body, bytes):
        return body.decode('utf-8', 'replace')
    return body or ''


def _json_error(body):
    """The ``error`` (or ``message``) string of a JSON error answer, else None."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if isinstance(data, dict):
        for key in ('error', 'message'):
            if isinstance(data.get(key), str):
                return data[key]
    return None


def _round(value, digits):
    return None if value is None else round(value, digits)


def _sent_before_the_first_pass(usage):
    """True for a chunk the fork's read loop sent before its first pass over an empty buffer.

    The fork's answer starts with ``tokens_per_second`` as the integer 0 (src/process.py:24-29); each
    pass of its read loop that finds the buffer empty sets it to ``count / total``, a float
    (process.py:119-123), and the loop makes such a pass long before the runtime's first token
    (the prompt's prefill takes far longer than one pass). So a chunk still carrying the integer 0 was
    already in the shared buffer when the generation started: the unread end of an earlier answer
    (process.py:72-79, 102-126 leave the last token there), not a token of this one.
    """
    rate = usage.get('tokens_per_second') if isinstance(usage, dict) else None
    return isinstance(rate, int) and not isinstance(rate, bool) and rate == 0  # the integer 0, not 0.0


class Generation(object):
    """What one streamed ``/generate`` answer held, and when its parts arrived.

    Times are seconds since the request was sent. Leading chunks that were in rkllama's buffer
    before this generation started (an unpatched fork's leftovers of an earlier answer, see
    ``_sent_before_the_first_pass``) are kept apart in ``stale_pieces`` and left out of the text and
    of every figure, once a chunk of the generation itself confirms it (a server that never sends a
    rate gets none of its chunks set apart: ``settle()``).
    """

    def __init__(self):
        self.pieces = []
        self.stale_pieces = []
        self.stale_at = None
        self._leading = []
        self.chunks = 0
        self.malformed = 0
        self.first_token_at = None
        self.last_token_at = None
        self.usage = {}
        self.finish_reason = None
        self.complete = False
        self.elapsed = None

    @property
    def text(self):
        return ''.join(self.pieces)

    def add(self, obj, at):
        """Take one JSON object of the stream, received ``at`` seconds after the request."""
        choices = obj.get('choices') if isinstance(obj, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            self.malformed += 1
            return
        content = choices[0].get('content')
        usage = obj.get('usage')
        if not self.chunks and _sent_before_the_first_pass(usage):
            self._leading.append((obj, at))
            return
        if self._leading:
            # The generation's own first chunk: what came before it was left over from an earlier answer.
            self.stale_at = self._leading[0][1]
            self.stale_pieces = [lead['choices'][0].get('content') or '' for lead, _at in self._leading]
            self._leading = []
        self._count(obj, content, usage, at)

    def settle(self):
        """At the end of the stream: leading chunks nothing confirmed as leftovers are the answer's own."""
        leading, self._leading = self._leading, []
        for obj, at in leading:
            self._count(obj, obj['choices'][0].get('content'), obj.get('usage'), at)

    def _count(self, obj, content, usage, at):
        self.chunks += 1
        if isinstance(content, str) and content:
            self.pieces.append(content)
            if self.first_token_at is None:
                self.first_token_at = at
            self.last_token_at = at
        if obj['choices'][0].get('finish_reason'):
            self.finish_reason = obj['choices'][0]['finish_reason']
        if isinstance(usage, dict):
            self.usage = usage

    @property
    def stale_text(self):
        return ''.join(self.stale_pieces)

    @property
    def completion_tokens(self):
        """The server's count when it sent one, else one token per chunk (the fork's unit); leftovers not counted."""
        count = self.usage.get('completion_tokens')
        if isinstance(count, int) and not isinstance(count, bool) and count > len(self.stale_pieces):
            return count - len(self.stale_pieces)
        return self.chunks

    @property
    def tokens_per_second(self):
        """The server's figure when present (and not inflated by leftovers), else chunks after the first over their time span."""
        rate = self.usage.get('tokens_per_second')
        if isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0 and not self.stale_pieces:
            return float(rate)
        if self.chunks >= 2 and self.first_token_at is not None and self.last_token_at > self.first_token_at:
            return (self.chunks - 1) / (self.last_token_at - self.first_token_at)
        return None

    def figures(self):
        self.settle()
        return {
            'time_to_first_token': _round(self.first_token_at, 3),
            'tokens_per_second': _round(self.tokens_per_second, 2),
            'completion_tokens': self.completion_tokens,
            'stale_tokens': len(self.stale_pieces),
        }


class RkllamaClient(object):
    """rkllama's old API at ``url``; every call shares one deadline of ``timeout`` seconds."""

    def __init__(self, url, timeout, opener=None, clock=time.monotonic):
        self.url = url.rstrip('/')
        self.timeout = float(timeout)
        self._open = opener or make_opener(self.url)
        self._clock = clock
        self.deadline = clock() + self.timeout
        # (method, path) of every request sent, in order: what the caller did to the server.
        self.sent = []

    def restart_clock(self):
        """Give the following calls a fresh ``timeout`` (used to put a model back after a failure)."""
        self.deadline = self._clock() + self.timeout

    def remaining(self, path=None):
        left = self.deadline - self._clock()
        if left <= 0:
            raise RkllamaTimeout('the %s s timeout passed before %s answered' % (self.timeout, path or self.url), path)
        return left

    # -- transport -------------------------------------------------------

    def _request(self, method, path, payload=None, cap=None):
        """Send one request; return the open response (2xx) or raise an RkllamaError.

        ``cap`` bounds the wait for answers that are instant on a healthy server, so a hung
        server is reported in seconds rather than at the end of a timeout sized for generation.
        """
        headers = {'Accept': 'application/json'}
        data = None
        if method == 'POST':
            data = json.dumps(payload if payload is not None else {}).encode('utf-8')
            headers['Content-Type'] = 'application/json'
        self.sent.append((method, path))
        try:
            return self._open(method, self.url + path, data, headers, min(self.remaining(path), cap or self.timeout))
        except urllib.error.HTTPError as exc:
            self._raise_http_error(exc, path)
        except urllib.error.URLError as exc:
            if is_timeout(exc):
                raise RkllamaTimeout('no answer from %s%s within the timeout' % (self.url, path), path)
            raise RkllamaUnreachable('%s%s: %s' % (self.url, path, exc.reason), path, reason=str(exc.reason))
        except (socket.timeout, TimeoutError):
            raise RkllamaTimeout('no answer from %s%s within the timeout' % (self.url, path), path)
        except (http.client.HTTPException, OSError) as exc:
            raise RkllamaUnreachable('%s%s: %s' % (self.url, path, exc), path, reason=str(exc) or type(exc).__name__)

    def _raise_http_error(self, exc, path):
        body = ''
        try:
            try:
                _set_read_timeout(exc, self.remaining(path))
                body = _decode(exc.read(_MAX_BODY))
            except (http.client.HTTPException, OSError, AttributeError):
                pass
        finally:
            try:
                exc.close()
            except Exception:  # pylint: disable=broad-except
                pass
        content_type = ''
        if getattr(exc, 'headers', None) is not None:
            content_type = exc.headers.get('Content-Type', '')
        html = looks_like_html(body, content_type)
        error = None if html else _json_error(body)
        detail = error or ('an HTML error page' if html else body.strip()[:200] or 'no details')
        raise RkllamaHTTPError('%s%s answered HTTP %s: %s' % (self.url, path, exc.code, detail),
                               path, status=exc.code, error=error, html=html, body=body[:2000])

    def _read_all(self, response, path, cap=None):
        try:
            _set_read_timeout(response, min(self.remaining(path), cap or self.timeout))
            return _decode(response.read(_MAX_BODY))
        except (socket.timeout, TimeoutError):
            raise RkllamaTimeout('%s%s did not finish its answer within the timeout' % (self.url, path), path)
        except (http.client.HTTPException, OSError) as exc:
            raise RkllamaUnreachable('%s%s: connection lost while reading the answer: %s' % (self.url, path, exc),
                                     path, reason=str(exc))
        finally:
            response.close()

    def _json(self, method, path, payload=None, cap=None):
        response = self._request(method, path, payload, cap)
        body = self._read_all(response, path, cap)
        try:
            return json.loads(body)
        except ValueError:
            raise RkllamaProtocolError('%s%s answered with something that is not JSON: %r' % (self.url, path, body[:120]), path)

    # -- the API ---------------------------------------------------------

    def health(self):
        """``GET /``: rkllama's only health check. Returns its JSON greeting."""
        return self._json('GET', '/', cap=QUICK_ANSWER_SECONDS)

    def current_model(self):
        """``GET /current_model``: the loaded model's name, or None when none is loaded."""
        try:
            data = self._json('GET', '/current_model', cap=QUICK_ANSWER_SECONDS)
        except RkllamaHTTPError as exc:
            # 404 with the fork's JSON error = no model loaded; an HTML 404 = no such route.
            if exc.status == 404 and not exc.html:
                return None
            raise
        if not isinstance(data, dict):
            raise RkllamaProtocolError('%s/current_model answered %r, not {"model_name": ...}' % (self.url, data), '/current_model')
        name = data.get('model_name')
        return name if isinstance(name, str) and name else None

    def list_models(self):
        """``GET /models``: the model directories rkllama can load."""
        data = self._json('GET', '/models', cap=QUICK_ANSWER_SECONDS)
        models = data.get('models') if isinstance(data, dict) else None
        if not isinstance(models, list):
            raise RkllamaProtocolError('%s/models answered %r, not {"models": [...]}' % (self.url, data), '/models')
        return sorted(str(m) for m in models)

    def load_model(self, name):
        """``POST /load_model``; returns the seconds it took. Blocks while the runtime initialises."""
        start = self._clock()
        self._json('POST', '/load_model', {'model_name': name})
        return self._clock() - start

    def unload_model(self):
        """``POST /unload_model``."""
        self._json('POST', '/unload_model')

    @staticmethod
    def _take(generation, line, at):
        line = line.strip()
        if not line:
            return
        try:
            obj = json.loads(line.decode('utf-8', 'replace'))
        except ValueError:
            # Keep reading: stopping here would leave the generation running.
            generation.malformed += 1
            return
        generation.add(obj, at)

    def generate(self, messages):
        """``POST /generate`` streamed, read to its end. Returns a Generation.

        The stream is one JSON object per token, each followed by a blank line, ending when
        the generation does. On a timeout the RkllamaTimeout carries what was read so far.
        """
        path = '/generate'
        start = self._clock()
        response = self._request('POST', path, {'messages': messages, 'stream': True})
        generation = Generation()
        # read1 returns what has arrived (so first-token times are real) and, unlike readline,
        # raises IncompleteRead when a chunked stream is cut off instead of ending.
        read = getattr(response, 'read1', None) or response.read
        pending = b''
        try:
            while True:
                try:
                    _set_read_timeout(response, self.remaining(path))
                    data = read(65536)
                except RkllamaTimeout as exc:
                    generation.elapsed = self._clock() - start
                    exc.partial = generation
                    raise
                except (socket.timeout, TimeoutError):
                    generation.elapsed = self._clock() - start
                    raise RkllamaTimeout('%s%s did not finish its answer within the timeout' % (self.url, path),
                                         path, partial=generation)
                except (http.client.HTTPException, OSError) as exc:
                    raise RkllamaUnreachable('%s%s: connection lost in the middle of the answer: %s' % (self.url, path, exc),
                                             path, reason=str(exc) or type(exc).__name__)
                if not data:
                    break
                pending += data
                lines = pending.split(b'\n')
                pending = lines.pop()
                at = self._clock() - start
                for line in lines:
                    self._take(generation, line, at)
        finally:
            response.close()
        self._take(generation, pending, self._clock() - start)
        generation.settle()
        generation.complete = True
        generation.elapsed = self._clock() - start
        if generation.chunks == 0 and generation.malformed:
            raise RkllamaProtocolError('%s%s answered with %d lines that are not rkllama stream chunks'
                                       % (self.url, path, generation.malformed), path)
        return generation
