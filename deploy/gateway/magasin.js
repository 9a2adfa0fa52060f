// magasin API gateway (njs), rendered from src/magasin/gateway/templates/magasin.js.j2.
// The paths every service answers for its own part -- its health, its read models, the dead
// letters of its consumers, its OpenAPI document -- are asked of each service (one process
// each, through the internal location /_service/<service>/...) and merged into the answer
// embedded mode gives on its one port. Only what such a merge needs is here: every other
// route is a plain proxy_pass in nginx.conf.

var SERVICES = ["transaction", "payment", "inventory", "store", "audit", "eventstore"];

function ask(r, service, path, args) {
    return r.subrequest('/_service/' + service + path, {args: args || '', method: 'GET'})
        .then(function (reply) {
            return {service: service, status: reply.status, text: reply.responseText || ''};
        });
}

function parse(text) {
    try {
        return JSON.parse(text);
    } catch (e) {
        return null;
    }
}

function send(r, status, body, extra) {
    r.headersOut['Content-Type'] = 'application/json';
    r.headersOut['X-Request-Id'] = r.variables.magasin_request_id;
    if (extra) {
        Object.keys(extra).forEach(function (name) { r.headersOut[name] = extra[name]; });
    }
    r.return(status, typeof body === 'string' ? body : JSON.stringify(body));
}

function onlyGet(r) {
    if (r.method === 'GET') {
        return true;
    }
    send(r, 405, {error: 'method_not_allowed', detail: 'Method Not Allowed'}, {Allow: 'GET'});
    return false;
}

// A caller's mistake (4xx) is answered as the first service answered it; a service that
// did not answer makes the merged answer unavailable rather than silently partial.
function failed(r, parts) {
    var wrong = parts.filter(function (p) { return p.status >= 400 && p.status < 500; });
    if (wrong.length) {
        send(r, wrong[0].status, wrong[0].text);
        return true;
    }
    var down = parts.filter(function (p) { return p.status !== 200; });
    if (down.length) {
        var names = down.map(function (p) { return p.service + ' (' + p.status + ')'; });
        send(r, 503, {error: 'unavailable', detail: 'no answer from ' + names.join(', ')},
             {'Retry-After': '1'});
        return true;
    }
    return false;
}

function all(r, services, path, args) {
    return Promise.all(services.map(function (s) { return ask(r, s, path, args); }));
}

function projections(r) {
    if (!onlyGet(r)) {
        return;
    }
    all(r, SERVICES, '/api/projections', '').then(function (parts) {
        if (failed(r, parts)) {
            return;
        }
        var merged = [];
        parts.forEach(function (p) { merged = merged.concat(parse(p.text) || []); });
        merged.sort(function (a, b) { return a.name < b.name ? -1 : (a.name > b.name ? 1 : 0); });
        send(r, 200, merged);
    }).catch(function (e) { send(r, 500, {error: 'gateway_error', detail: String(e)}); });
}

function owner(consumer) {
    var head = consumer.split(':')[0].split('.')[0];
    return SERVICES.indexOf(head) >= 0 ? head : null;
}

function deadLetters(r) {
    if (!onlyGet(r)) {
        return;
    }
    var consumer = r.args.consumer;
    // A consumer belongs to one service; an unknown one gets embedded mode's answer (none)
    // from any service: the transaction service's.
    var services = consumer ? [owner(String(consumer)) || 'transaction'] : SERVICES;
    var limit = parseInt(r.args.limit || '100', 10);
    all(r, services, '/api/dead-letters', r.variables.args || '').then(function (parts) {
        if (failed(r, parts)) {
            return;
        }
        var items = [];
        parts.forEach(function (p) { items = items.concat((parse(p.text) || {items: []}).items); });
        // Oldest first across services, as one store would list them; each service applied
        // the limit to its own letters, so the first `limit` of the merge are the oldest.
        items.sort(function (a, b) {
            var x = Date.parse(a.dead_lettered_at), y = Date.parse(b.dead_lettered_at);
            return x - y;
        });
        send(r, 200, {items: items.slice(0, limit)});
    }).catch(function (e) { send(r, 500, {error: 'gateway_error', detail: String(e)}); });
}

function health(r) {
    if (!onlyGet(r)) {
        return;
    }
    all(r, SERVICES, '/health', '').then(function (parts) {
        var body = {status: 'ok', version: null, mode: 'distributed', services: [],
                    processes: {}, checks: {}};
        parts.forEach(function (p) {
            var doc = parse(p.text);
            var state = {http_status: p.status};
            if (doc && doc.status) {
                state.status = doc.status;
                state.event_log_position = doc.event_log_position;
                if (doc.store_error) {
                    state.store_error = doc.store_error;
                }
            } else {
                state.status = 'unreachable';
            }
            if (p.status !== 200 || state.status !== 'ok') {
                body.status = 'degraded';
            }
            if (doc && doc.version) {
                body.version = body.version || doc.version;
            }
            if (doc && doc.checks) {
                Object.keys(doc.checks).forEach(function (k) { body.checks[k] = doc.checks[k]; });
            }
            body.services.push(p.service);
            body.processes[p.service] = state;
        });
        send(r, body.status === 'ok' ? 200 : 503, body);
    }).catch(function (e) { send(r, 500, {error: 'gateway_error', detail: String(e)}); });
}

// -- one OpenAPI document for the whole API -------------------------------------------------

var GATEWAY_PATHS = {
    '/health/{service}': {get: {
        tags: ['health'], summary: 'One service\'s health (one of its processes)',
        operationId: 'service_health', security: [],
        parameters: [{name: 'service', in: 'path', required: true,
                      schema: {type: 'string', enum: SERVICES}}],
        responses: {'200': {description: 'The service\'s /health'},
                    '503': {description: 'Degraded'}}}},
    '/metrics/{service}': {get: {
        tags: ['health'], summary: 'Prometheus metrics of one process of a service',
        operationId: 'service_metrics', security: [],
        parameters: [{name: 'service', in: 'path', required: true,
                      schema: {type: 'string', enum: SERVICES}}],
        responses: {'200': {description: 'Prometheus text exposition'}}}}
};

// The same schema name with another definition in a later service is renamed
// `<service>__<name>` in that service's document (the schema and every reference to it)
// before merging.
function renamed(text, known, service) {
    var doc = parse(text);
    var schemas = (doc.components || {}).schemas || {};
    var clashes = Object.keys(schemas).filter(function (name) {
        return known[name] !== undefined && JSON.stringify(known[name]) !== JSON.stringify(schemas[name]);
    });
    if (!clashes.length) {
        return doc;
    }
    clashes.forEach(function (name) {
        var from = '"#/components/schemas/' + name + '"';
        text = text.split(from).join('"#/components/schemas/' + service + '__' + name + '"');
    });
    doc = parse(text);
    clashes.forEach(function (name) {
        doc.components.schemas[service + '__' + name] = doc.components.schemas[name];
        delete doc.components.schemas[name];
    });
    return doc;
}

function openapi(r) {
    if (!onlyGet(r)) {
        return;
    }
    all(r, SERVICES, '/openapi.json', '').then(function (parts) {
        if (failed(r, parts)) {
            return;
        }
        var merged = null;
        parts.forEach(function (p) {
            var doc = parse(p.text);
            var components = (doc.components || {});
            if (merged === null) {
                merged = {openapi: doc.openapi, info: doc.info, paths: {},
                          components: {schemas: {}}};
            } else {
                doc = renamed(p.text, merged.components.schemas, p.service);
                components = doc.components || {};
            }
            Object.keys(doc.paths).forEach(function (path) {
                if (path === '/metrics') {  // per process: /metrics/{service}
                    return;
                }
                var item = merged.paths[path] = merged.paths[path] || {};
                Object.keys(doc.paths[path]).forEach(function (method) {
                    if (item[method] === undefined) {
                        item[method] = doc.paths[path][method];
                    }
                });
            });
            Object.keys(components).forEach(function (kind) {
                var into = merged.components[kind] = merged.components[kind] || {};
                Object.keys(components[kind]).forEach(function (name) {
                    if (into[name] === undefined) {
                        into[name] = components[kind][name];
                    }
                });
            });
        });
        Object.keys(GATEWAY_PATHS).forEach(function (path) { merged.paths[path] = GATEWAY_PATHS[path]; });
        merged.info.description = (merged.info.description || '') +
            ' Distributed mode: every service behind one gateway (' + SERVICES.join(', ') + ').';
        send(r, 200, merged);
    }).catch(function (e) { send(r, 500, {error: 'gateway_error', detail: String(e)}); });
}

export default {projections, deadLetters, health, openapi};
