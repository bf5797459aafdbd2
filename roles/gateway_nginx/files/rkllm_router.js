// rkllm.fleet gateway router (njs). Managed by Ansible (roles/gateway_nginx/files/rkllm_router.js).
//
// Routes each /v1/ request by its `model` field to the pool of boards serving that model (one nginx
// upstream per model, least_conn inside it), answers /v1/models itself, picks a model for `auto`, and
// counts requests per model for /metrics/models. The fleet's data (pools, names, rules) is
// rkllm_fleet.js, rendered from the inventory with to_json: no inventory string is pasted into code.
//
// Written for the oldest njs a supported gateway ships: Debian 12's 0.7.9 (no optional chaining, no
// shared dictionaries); the request counters need js_shared_dict_zone (njs >= 0.8.0, Debian 13) and
// are used only when the role rendered one (fleet.metrics). Pure functions take the fleet data as an
// argument, so tests run them with the `njs` CLI.
import fs from 'fs';
import fleet from 'rkllm_fleet.js';

var JSON_PATHS = ['/v1/chat/completions', '/v1/completions'];
var BUCKETS = [0.5, 1, 2.5, 5, 10, 30, 60, 120, 300];
var SEP = '|';

function lower(s) {
    return String(s).toLowerCase();
}

function poolBySlug(f, slug) {
    for (var i = 0; i < f.pools.length; i++) {
        if (f.pools[i].slug === slug) {
            return f.pools[i];
        }
    }
    return null;
}

// The pool a name (catalog name, exo id; any case) belongs to, and the name's canonical spelling.
function poolByName(f, name) {
    var low = lower(name);
    for (var i = 0; i < f.pools.length; i++) {
        var names = [f.pools[i].id, f.pools[i].name].concat(f.pools[i].aliases);
        for (var j = 0; j < names.length; j++) {
            if (lower(names[j]) === low) {
                return {pool: f.pools[i], spelling: names[j]};
            }
        }
    }
    return null;
}

function servedNames(f) {
    var ids = f.pools.map(function (p) { return p.id; });
    if (f.auto) {
        ids.push(f.auto);
    }
    return ids.join(', ');
}

function error(status, message, type, param, code, extra) {
    var d = {status: status, answer: {error: {message: message, type: type, param: param, code: code}}};
    if (extra) {
        Object.keys(extra).forEach(function (k) { d[k] = extra[k]; });
    }
    return d;
}

// The text of a message's content: a string, or OpenAI's list of parts ({type: "text", text}).
function contentText(c) {
    if (typeof c === 'string') {
        return c;
    }
    if (Array.isArray(c)) {
        return c.map(function (p) {
            return (p && typeof p === 'object' && typeof p.text === 'string') ? p.text : '';
        }).join('\n');
    }
    return '';
}

function messagesText(body, role) {
    var out = [];
    if (Array.isArray(body.messages)) {
        body.messages.forEach(function (m) {
            if (m && typeof m === 'object' && (role === null || m.role === role)) {
                out.push(contentText(m.content));
            }
        });
    }
    if (role === null && typeof body.prompt === 'string') {
        out.push(body.prompt);
    }
    return out;
}

// `auto`: the first rule whose conditions all hold and whose model is served, else the fallback.
// Conditions: reasoning_effort (true: the field is set; false: it is not), system_marker (substring of
// a system message, any case), min_prompt_chars (characters of every message's text together).
function autoPick(f, body) {
    for (var i = 0; i < f.rules.length; i++) {
        var rule = f.rules[i];
        var pool = poolBySlug(f, rule.pool);
        if (pool === null) {
            continue;
        }
        var ok = true;
        if (rule.reasoning_effort !== undefined) {
            var set = body.reasoning_effort !== undefined && body.reasoning_effort !== null;
            ok = ok && (set === rule.reasoning_effort);
        }
        if (rule.system_marker !== undefined) {
            var marker = lower(rule.system_marker);
            ok = ok && messagesText(body, 'system').some(function (t) { return lower(t).indexOf(marker) >= 0; });
        }
        if (rule.min_prompt_chars !== undefined) {
            ok = ok && messagesText(body, null).join('').length >= rule.min_prompt_chars;
        }
        if (ok) {
            return {pool: pool, rule: i};
        }
    }
    return {pool: poolBySlug(f, f.auto_fallback), rule: 'fallback'};
}

function modelObject(f, pool, ready) {
    return {id: pool.id, object: 'model', created: 0, owned_by: 'rkllm-fleet',
            rkllm: {name: pool.name, boards: ready[pool.slug] === undefined ? pool.ready : ready[pool.slug],
                    aliases: [pool.name].concat(pool.aliases)}};
}

// `auto`: its boards are those of every pool it can choose.
function autoObject(f, ready) {
    var slugs = [f.auto_fallback];
    f.rules.forEach(function (r) {
        if (slugs.indexOf(r.pool) < 0) {
            slugs.push(r.pool);
        }
    });
    var pools = slugs.map(function (s) { return poolBySlug(f, s); }).filter(function (p) { return p !== null; });
    var boards = 0;
    pools.forEach(function (p) { boards += ready[p.slug] === undefined ? p.ready : ready[p.slug]; });
    return {id: f.auto, object: 'model', created: 0, owned_by: 'rkllm-fleet',
            rkllm: {name: f.auto, boards: boards, aliases: [], auto: true,
                    models: pools.map(function (p) { return p.name; })}};
}

// GET /v1/models: exactly the served models, each with its boards in service (`ready`: slug -> count).
function modelList(f, ready) {
    var data = f.pools.map(function (p) { return modelObject(f, p, ready); });
    if (f.auto) {
        data.push(autoObject(f, ready));
    }
    return {object: 'list', data: data};
}

// Boards in service per pool, read from nginx.conf as drain.yml left it: one
// `server ADDRESS [options][ down]; # board NAME` line per board inside `upstream rkllm_pool_<slug> {}`.
function readyFromConf(text) {
    var ready = {};
    var re = /upstream rkllm_pool_([a-z0-9_]+) \{([^}]*)\}/g;
    var m = re.exec(text);
    while (m !== null) {
        var n = 0;
        m[2].split('\n').forEach(function (line) {
            if (/^\s*server [^;#]*; # board \S+\s*$/.test(line) && !/ down; # board /.test(line)) {
                n++;
            }
        });
        ready[m[1]] = n;
        m = re.exec(text);
    }
    return ready;
}

function label(s) {
    return String(s).replace(/[\\"]/g, '\\$&').replace(/\n/g, '\\n');
}

// The decision for one request: {status, answer} to answer it here, or {pool, rewrite} to send it on.
// `sent` is the model field as the client wrote it (for the access log); `requested` its bounded metrics
// label: the canonical spelling of a known name, "gpt-*", "other" (unknown) or "none".
function decide(f, method, path, text) {
    var d;
    var fallback = poolBySlug(f, f.default_pool);
    if (f.routing === false) {
        // gateway_nginx_model_routing false: every board one pool, every request as sent (as before routing).
        if (fallback === null || fallback.ready === 0) {
            return error(503, 'No board is in service: every board is drained or none passed provisioning.',
                         'server_error', null, 'no_board_available', {sent: 'none', requested: 'none', retry_after: f.retry_after});
        }
        return {status: 0, pool: fallback, rewrite: null, sent: 'none', requested: 'none'};
    }
    if (path === '/v1/models' || path === '/v1/models/') {
        return {status: 200, answer: modelList(f, {}), sent: 'none', requested: 'none', list: true};
    }
    if (path.indexOf('/v1/models/') === 0) {
        var want = path.substring('/v1/models/'.length);
        if (f.auto && lower(want) === lower(f.auto)) {
            return {status: 200, answer: autoObject(f, {}), sent: want, requested: f.auto, one_auto: true};
        }
        var hit = poolByName(f, want);
        if (hit === null) {
            return error(404, "The model '" + want.substring(0, 100) + "' does not exist on this fleet. Served models: " +
                         servedNames(f) + '.', 'invalid_request_error', 'model', 'model_not_found',
                         {sent: want.substring(0, 128), requested: 'other'});
        }
        return {status: 200, answer: modelObject(f, hit.pool, {}), sent: want, requested: hit.spelling, one: hit.pool.slug};
    }
    var body = null;
    if (method === 'POST' && text !== '') {
        try {
            body = JSON.parse(text);
        } catch (e) {
            body = null;
        }
    }
    if (body === null || typeof body !== 'object' || Array.isArray(body)) {
        if (method === 'POST' && JSON_PATHS.indexOf(path) >= 0) {
            return error(400, 'The request body must be a JSON object (OpenAI chat completion request).',
                         'invalid_request_error', null, 'invalid_json', {sent: 'none', requested: 'none'});
        }
        // No model to read (GET, or a body that is not JSON): the default model's pool, body untouched.
        return {status: 0, pool: fallback, rewrite: null, sent: 'none', requested: 'none'};
    }
    var model = body.model;
    var sent = (model === undefined || model === null) ? 'none' : String(model).substring(0, 128);
    var pool = null;
    var requested = 'none';
    if (model === undefined || model === null || model === '') {
        pool = fallback;
    } else if (typeof model !== 'string') {
        return error(400, 'The model field must be a string.', 'invalid_request_error', 'model', 'invalid_model',
                     {sent: sent, requested: 'other'});
    } else if (f.auto && lower(model) === lower(f.auto)) {
        var picked = autoPick(f, body);
        pool = picked.pool;
        requested = f.auto;
    } else if (lower(model).indexOf('gpt-') === 0) {
        // OpenAI clients send their own default (gpt-4o-mini, ...): the fleet's default model answers.
        pool = fallback;
        requested = 'gpt-*';
    } else {
        var found = poolByName(f, model);
        if (found === null) {
            return error(404, "The model '" + model.substring(0, 100) + "' does not exist on this fleet. Served models: " +
                         servedNames(f) + '.', 'invalid_request_error', 'model', 'model_not_found',
                         {sent: sent, requested: 'other'});
        }
        pool = found.pool;
        requested = found.spelling;
    }
    if (pool === null) {
        return error(503, 'No board is in service: every board is drained or none passed provisioning.',
                     'server_error', null, 'no_board_available', {sent: sent, requested: requested, retry_after: f.retry_after});
    }
    if (pool.ready === 0) {
        d = error(503, "No board serving the model '" + pool.name + "' is in service (all drained or left out). " +
                  'Try again later; the gateway never sends a request to a board serving another model.',
                  'server_error', 'model', 'model_unavailable', {sent: sent, requested: requested, retry_after: f.retry_after});
        d.pool = pool;
        return d;
    }
    // The board gets the model's exo id whatever name the client used, so its answer names that model.
    var rewrite = null;
    if (model !== pool.id) {
        body.model = pool.id;
        rewrite = JSON.stringify(body);
    }
    return {status: 0, pool: pool, rewrite: rewrite, sent: sent, requested: requested};
}

function answer(r, status, obj) {
    r.headersOut['Content-Type'] = 'application/json';
    r.return(status, JSON.stringify(obj) + '\n');
}

function readyNow() {
    try {
        return readyFromConf(fs.readFileSync(fleet.conf, 'utf8'));
    } catch (e) {
        return {};
    }
}

// js_content of location /v1/ (after the API key, path and limit checks).
function route(r) {
    var text = '';
    if (r.method === 'POST') {
        text = r.requestText;
        if (text === undefined || text === null) {
            text = '';
        }
    }
    var d = decide(fleet, r.method, r.uri, text);
    r.variables.rkllm_model_requested = d.sent;
    r.variables.rkllm_requested = d.requested;
    r.variables.rkllm_model = d.pool ? d.pool.name : 'unknown';
    r.variables.rkllm_pool = d.pool ? d.pool.name : 'none';
    if (d.list) {
        answer(r, 200, modelList(fleet, readyNow()));
        return;
    }
    if (d.one_auto) {
        answer(r, 200, autoObject(fleet, readyNow()));
        return;
    }
    if (d.one) {
        answer(r, 200, modelObject(fleet, poolBySlug(fleet, d.one), readyNow()));
        return;
    }
    if (d.answer) {
        if (d.retry_after) {
            r.headersOut['Retry-After'] = String(d.retry_after);
        }
        answer(r, d.status, d.answer);
        return;
    }
    r.variables.rkllm_upstream = d.pool.upstream;
    if (d.rewrite !== null) {
        r.variables.rkllm_body = d.rewrite;
        r.internalRedirect('@rkllm_pool_rewritten');
    } else {
        r.internalRedirect('@rkllm_pool');
    }
}

// The counters, from the shared dictionary's [key, value] pairs, plus the pool gauges.
function metricsText(f, items, ready) {
    var out = [];
    var req = [];
    var hist = {};
    items.sort(function (a, b) { return a[0] < b[0] ? -1 : (a[0] > b[0] ? 1 : 0); });
    items.forEach(function (kv) {
        var k = kv[0].split(SEP);
        if (k[0] === 'r' && k.length === 5) {
            req.push('rkllm_gateway_requests_total{requested="' + label(k[1]) + '",model="' + label(k[2]) +
                     '",pool="' + label(k[3]) + '",code="' + label(k[4]) + '"} ' + kv[1]);
        } else if ((k[0] === 'b' || k[0] === 's' || k[0] === 'c') && k.length >= 2) {
            var h = hist[k[1]] || (hist[k[1]] = {b: {}, s: 0, c: 0});
            if (k[0] === 'b') {
                h.b[k[2]] = kv[1];
            } else {
                h[k[0]] = kv[1];
            }
        }
    });
    out.push('# HELP rkllm_gateway_requests_total Requests to /v1/ by the model asked for, the model chosen, its pool and the HTTP status.');
    out.push('# TYPE rkllm_gateway_requests_total counter');
    out = out.concat(req);
    out.push('# HELP rkllm_gateway_request_duration_seconds Time from the request to the end of the answer, by the model chosen.');
    out.push('# TYPE rkllm_gateway_request_duration_seconds histogram');
    Object.keys(hist).sort().forEach(function (m) {
        var h = hist[m];
        BUCKETS.forEach(function (le) {
            out.push('rkllm_gateway_request_duration_seconds_bucket{model="' + label(m) + '",le="' + le + '"} ' + (h.b[String(le)] || 0));
        });
        out.push('rkllm_gateway_request_duration_seconds_bucket{model="' + label(m) + '",le="+Inf"} ' + h.c);
        out.push('rkllm_gateway_request_duration_seconds_sum{model="' + label(m) + '"} ' + h.s);
        out.push('rkllm_gateway_request_duration_seconds_count{model="' + label(m) + '"} ' + h.c);
    });
    out.push('# HELP rkllm_gateway_pool_boards Boards in service in the pool of each model (provisioned and not drained).');
    out.push('# TYPE rkllm_gateway_pool_boards gauge');
    f.pools.forEach(function (p) {
        out.push('rkllm_gateway_pool_boards{model="' + label(p.name) + '"} ' + (ready[p.slug] === undefined ? p.ready : ready[p.slug]));
    });
    out.push('# HELP rkllm_gateway_pool_boards_configured Boards of the inventory assigned to each model.');
    out.push('# TYPE rkllm_gateway_pool_boards_configured gauge');
    f.pools.forEach(function (p) {
        out.push('rkllm_gateway_pool_boards_configured{model="' + label(p.name) + '"} ' + p.configured);
    });
    return out.join('\n') + '\n';
}

function dict() {
    return (fleet.metrics && typeof ngx !== 'undefined' && ngx.shared) ? ngx.shared.rkllm_models : null;
}

// js_content of /metrics/models.
function metrics(r) {
    var d = dict();
    var items = d ? d.items() : [];
    r.headersOut['Content-Type'] = 'text/plain; version=0.0.4';
    r.return(200, metricsText(fleet, items, readyNow()));
}

// js_set of the access log's tap: evaluated when nginx writes the log line, after the answer went out.
function record(r) {
    var d = dict();
    if (d === null || r.uri.indexOf('/v1/') !== 0) {
        return '';
    }
    var v = r.variables;
    var model = v.rkllm_model || 'unknown';
    var key = ['r', v.rkllm_requested || 'none', model, v.rkllm_pool || 'none', v.status].join(SEP);
    d.incr(key, 1, 0);
    if (model !== 'unknown') {
        var t = parseFloat(v.request_time) || 0;
        BUCKETS.forEach(function (le) {
            if (t <= le) {
                d.incr(['b', model, String(le)].join(SEP), 1, 0);
            }
        });
        d.incr(['s', model].join(SEP), t, 0);
        d.incr(['c', model].join(SEP), 1, 0);
    }
    return '';
}

export default {route, metrics, record, decide, autoPick, modelList, readyFromConf, metricsText};
