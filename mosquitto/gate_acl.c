/*
 * gate_acl: a mosquitto 2.0 plugin (v5 API) for the gate-agent regional broker.
 * See docs/security.md ("Identity and broker ACLs").
 *
 * Two gaps of mosquitto 2.0 that matter to us, closed with the broker's own
 * ACL file (acl.conf) as the one list of rules:
 *
 * 1. Subscriptions. The acl_file decides publishing and delivery, but grants
 *    every SUBSCRIBE (src/security_default.c: "FIXME - implement ACL
 *    subscription strings"). A gate could so join the ingest's shared
 *    subscription: mosquitto hands it its round-robin share, then drops those
 *    messages under the read rules, and the events are never stored nor
 *    acknowledged. Here a SUBSCRIBE is granted only when every topic its filter
 *    can match is readable by the client under acl.conf, and a filter
 *    "$share/<group>/<topic>" only when a read rule names that shared form
 *    ("topic read $share/ingest/gate/v1/+/+/events"). Anything else gets
 *    SUBACK 0x87. UNSUBSCRIBE is always allowed: it only drops the client's
 *    own subscription.
 *
 * 2. The regional services' listener. On the gates' listener the client id is
 *    the certificate's CN (use_username_as_clientid), so no gate can take
 *    another's session. Several ingests or tool runs share one service
 *    certificate, so the services connect on a listener of their own, where
 *    they choose their client ids. There mosquitto asks the plugins to
 *    authenticate (MOSQ_EVT_BASIC_AUTH); we take the identity from the
 *    certificate, accept it only if acl.conf has a "user" block for it (a
 *    service: no '/' in its name), refuse a client id holding '/' (every gate
 *    id does, so no service session can take a gate's), and set the username
 *    to the CN whatever the client sent. A gate's certificate is refused there
 *    before mosquitto looks for a session to take over.
 *
 * Rules are read from plugin_opt_acl_file, the same file as acl_file, with
 * mosquitto's grammar (topic/pattern/user lines; '#' in column one is a
 * comment). Patterns expand %u (username) and %c (client id) as mosquitto
 * does, and %s: the site, the part of a gate's identity "{site}/{gate}" before
 * the '/'. Mosquitto cannot expand %s, so read rules holding it are decided
 * here (a gate may then read its own site's events); write rules may not hold
 * it. Publishing and every other delivery are left to the acl_file (DEFER).
 * A deny rule refuses any subscription whose filter reaches a denied topic.
 *
 * SIGHUP re-reads the file. A file that does not parse at start stops the
 * broker; at a reload it leaves an empty rule set (no subscription granted,
 * no service admitted, logged): better refuse than grant on rules that
 * mosquitto's own reading of the file may not share.
 *
 * Build: make broker-plugin (needs mosquitto-dev and libssl-dev).
 */
#define _POSIX_C_SOURCE 200809L /* getline */

#include <ctype.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <time.h>

#include <openssl/asn1.h>
#include <openssl/objects.h>
#include <openssl/x509.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define SHARE_PREFIX "$share/"
#define SHARE_PREFIX_LEN 7
#define LOG_PER_SECOND 20 /* refusals logged per second at most: a client can send thousands */
#define LOG_TEXT_MAX 200  /* a filter may be 64 KB: log its start */

struct rule {
	struct rule *next;
	char *topic;
	int access; /* MOSQ_ACL_READ | MOSQ_ACL_WRITE, or MOSQ_ACL_NONE for deny */
};

/* The rules after one "user" line (name NULL: before the first, for clients without a username). */
struct owner {
	struct owner *next;
	char *name;
	struct rule *rules;
};

struct ruleset {
	struct owner *owners;
	struct rule *patterns;
	bool site_reads; /* some read pattern holds %s: READ checks need us */
};

struct plugin {
	mosquitto_plugin_id_t *id;
	char *path;
	struct ruleset *rules;
	time_t log_second;
	unsigned log_count;
	unsigned long log_dropped;
};

/* Who asks: what a pattern may expand to. */
struct who {
	const char *username; /* NULL: none */
	const char *client_id;
	const char *site; /* not NUL-terminated: site_len bytes; NULL when not a gate identity */
	size_t site_len;
	bool patterns_ok; /* false when username or client id holds '+' or '#' (mosquitto's rule too) */
};

/* ------------------------------------------------------------------ topic levels */

static const char *level_end(const char *p)
{
	while(*p && *p != '/') p++;
	return p;
}

static bool level_is(const char *p, const char *end, char c)
{
	return end - p == 1 && p[0] == c;
}

/*
 * Does every topic that `filter` matches also match `rule`? Both are valid
 * MQTT filters. Topics starting with '$' are matched by no wildcard in the
 * first level. Iterative: filters may be 64 KB with thousands of levels.
 */
static bool covers(const char *rule, const char *filter)
{
	bool first = true;

	for(;;){
		const char *re = level_end(rule), *fe = level_end(filter);

		if(level_is(rule, re, '#')) return !(first && filter[0] == '$');
		if(level_is(filter, fe, '#')){
			/* Reaches deeper than this rule, but for "#" itself under "+/#" (every topic). */
			return first && level_is(rule, re, '+') && !strcmp(re, "/#");
		}
		if(level_is(rule, re, '+')){
			if(first && filter[0] == '$') return false;
		}else if(re - rule != fe - filter || memcmp(rule, filter, (size_t)(re - rule))){
			return false; /* a literal covers only itself, never '+' */
		}
		first = false;
		if(!*re && !*fe) return true;
		/* "a/#" also matches "a" itself */
		if(!*fe) return !strcmp(re + 1, "#");
		if(!*re) return false;
		rule = re + 1;
		filter = fe + 1;
	}
}

/* Is there a topic both filters match? */
static bool intersects(const char *a, const char *b)
{
	bool first = true;

	for(;;){
		const char *ae = level_end(a), *be = level_end(b);
		bool a_hash = level_is(a, ae, '#'), b_hash = level_is(b, be, '#');
		bool a_wild = a_hash || level_is(a, ae, '+'), b_wild = b_hash || level_is(b, be, '+');

		if(first && ((a_wild && b[0] == '$') || (b_wild && a[0] == '$'))) return false;
		if(a_hash || b_hash) return true;
		if(!a_wild && !b_wild && (ae - a != be - b || memcmp(a, b, (size_t)(ae - a)))) return false;
		first = false;
		if(!*ae && !*be) return true;
		if(!*ae) return !strcmp(be + 1, "#");
		if(!*be) return !strcmp(ae + 1, "#");
		a = ae + 1;
		b = be + 1;
	}
}

static bool is_share(const char *s)
{
	return !strncmp(s, SHARE_PREFIX, SHARE_PREFIX_LEN);
}

/* The topic part of "$share/<group>/<topic>", or NULL when there is none. */
static const char *share_topic(const char *s)
{
	const char *group_end = level_end(s + SHARE_PREFIX_LEN);
	return *group_end ? group_end + 1 : NULL;
}

/* May a client holding read rule `rule` subscribe to `filter`? */
static bool rule_grants(const char *rule, const char *filter)
{
	const char *rule_group, *filter_group, *rule_topic, *filter_topic;

	if(is_share(rule) != is_share(filter)) return false;
	if(!is_share(filter)) return covers(rule, filter);
	rule_group = rule + SHARE_PREFIX_LEN;
	filter_group = filter + SHARE_PREFIX_LEN;
	rule_topic = share_topic(rule);
	filter_topic = share_topic(filter);
	if(!rule_topic || !filter_topic) return false;
	/* The group is a name, not a topic level: literal, or '+' in the rule for any group. */
	if(!level_is(rule_group, rule_topic - 1, '+')
			&& (rule_topic - rule_group != filter_topic - filter_group
				|| memcmp(rule_group, filter_group, (size_t)(rule_topic - rule_group)))){
		return false;
	}
	return covers(rule_topic, filter_topic);
}

/* ------------------------------------------------------------------ patterns */

/*
 * Expand %u, %c and %s in a pattern into *out (malloc'd). Returns 0 done,
 * 1 the pattern does not apply to this client (no username, not a gate),
 * -1 out of memory.
 */
static int expand(const char *pattern, const struct who *w, char **out)
{
	size_t len = 0, n;
	char *s;

	*out = NULL;
	for(const char *p = pattern; *p; p++){
		if(p[0] == '%' && p[1] == 'u'){
			if(!w->username) return 1;
			n = strlen(w->username);
			p++;
		}else if(p[0] == '%' && p[1] == 'c'){
			n = strlen(w->client_id);
			p++;
		}else if(p[0] == '%' && p[1] == 's'){
			if(!w->site) return 1;
			n = w->site_len;
			p++;
		}else{
			n = 1;
		}
		if(len > SIZE_MAX - n - 1) return -1;
		len += n;
	}
	s = mosquitto_malloc(len + 1);
	if(!s) return -1;
	*out = s;
	for(const char *p = pattern; *p; p++){
		if(p[0] == '%' && p[1] == 'u'){
			n = strlen(w->username);
			memcpy(s, w->username, n);
			p++;
		}else if(p[0] == '%' && p[1] == 'c'){
			n = strlen(w->client_id);
			memcpy(s, w->client_id, n);
			p++;
		}else if(p[0] == '%' && p[1] == 's'){
			n = w->site_len;
			memcpy(s, w->site, n);
			p++;
		}else{
			n = 1;
			*s = *p;
		}
		s += n;
	}
	*s = '\0';
	return 0;
}

static void who_of(struct mosquitto *client, struct who *w)
{
	const char *slash;

	memset(w, 0, sizeof(*w));
	w->username = mosquitto_client_username(client);
	w->client_id = mosquitto_client_id(client);
	if(!w->client_id) w->client_id = "";
	w->patterns_ok = !(w->username && strpbrk(w->username, "+#")) && !strpbrk(w->client_id, "+#");
	/* %s exists only for a gate identity "{site}/{gate}": two non-empty levels. */
	if(w->username && (slash = strchr(w->username, '/')) && slash != w->username
			&& slash[1] && !strchr(slash + 1, '/')){
		w->site = w->username;
		w->site_len = (size_t)(slash - w->username);
	}
}

static const struct owner *owner_of(const struct ruleset *rs, const char *username)
{
	for(const struct owner *o = rs->owners; o; o = o->next){
		if(username ? (o->name && !strcmp(o->name, username)) : !o->name) return o;
	}
	return NULL;
}

/* ------------------------------------------------------------------ decisions */

enum verdict { REFUSE, GRANT, OUT_OF_MEMORY };

/*
 * SUBSCRIBE: granted when a read rule covers the filter and no deny rule
 * reaches any topic of it (stricter than mosquitto, where a user rule can
 * outrank a pattern's deny: here a subscription is never granted that would
 * lose deliveries).
 */
static enum verdict decide_subscribe(const struct ruleset *rs, const struct who *w, const char *filter)
{
	const struct owner *o = owner_of(rs, w->username);
	const char *topic = filter;
	bool granted = false;
	char *expanded;
	int rc;

	if(is_share(filter)){
		topic = share_topic(filter);
		if(!topic) return REFUSE;
	}
	for(const struct rule *r = o ? o->rules : NULL; r; r = r->next){
		if(r->access == MOSQ_ACL_NONE){
			if(intersects(r->topic, topic)) return REFUSE;
		}else if((r->access & MOSQ_ACL_READ) && rule_grants(r->topic, filter)){
			granted = true;
		}
	}
	if(!w->patterns_ok) return granted ? GRANT : REFUSE;
	for(const struct rule *r = rs->patterns; r; r = r->next){
		if(r->access != MOSQ_ACL_NONE && (granted || !(r->access & MOSQ_ACL_READ))) continue;
		rc = expand(r->topic, w, &expanded);
		if(rc < 0) return OUT_OF_MEMORY;
		if(rc > 0) continue;
		if(r->access == MOSQ_ACL_NONE){
			rc = intersects(expanded, topic);
			mosquitto_free(expanded);
			if(rc) return REFUSE;
		}else{
			granted = rule_grants(expanded, filter);
			mosquitto_free(expanded);
		}
	}
	return granted ? GRANT : REFUSE;
}

/* READ of one topic under the %s patterns mosquitto cannot expand (GRANT, or REFUSE = let the acl_file decide). */
static enum verdict decide_site_read(const struct ruleset *rs, const struct who *w, const char *topic)
{
	const struct owner *o;
	bool granted = false;
	char *expanded;
	int rc;

	if(!rs->site_reads || !w->site || !w->patterns_ok) return REFUSE;
	for(const struct rule *r = rs->patterns; r && !granted; r = r->next){
		if(!(r->access & MOSQ_ACL_READ) || !strstr(r->topic, "%s")) continue;
		rc = expand(r->topic, w, &expanded);
		if(rc < 0) return OUT_OF_MEMORY;
		if(rc > 0) continue;
		granted = intersects(expanded, topic);
		mosquitto_free(expanded);
	}
	if(!granted) return REFUSE;
	/* A deny rule anywhere still wins: leave those to the acl_file. */
	o = owner_of(rs, w->username);
	for(const struct rule *r = o ? o->rules : NULL; r; r = r->next){
		if(r->access == MOSQ_ACL_NONE && intersects(r->topic, topic)) return REFUSE;
	}
	for(const struct rule *r = rs->patterns; r; r = r->next){
		if(r->access != MOSQ_ACL_NONE) continue;
		rc = expand(r->topic, w, &expanded);
		if(rc < 0) return OUT_OF_MEMORY;
		if(rc > 0) continue;
		rc = intersects(expanded, topic);
		mosquitto_free(expanded);
		if(rc) return REFUSE;
	}
	return GRANT;
}

/* ------------------------------------------------------------------ the rules file */

static void free_rules(struct rule *r)
{
	while(r){
		struct rule *next = r->next;
		mosquitto_free(r->topic);
		mosquitto_free(r);
		r = next;
	}
}

static void free_ruleset(struct ruleset *rs)
{
	if(!rs) return;
	while(rs->owners){
		struct owner *next = rs->owners->next;
		free_rules(rs->owners->rules);
		mosquitto_free(rs->owners->name);
		mosquitto_free(rs->owners);
		rs->owners = next;
	}
	free_rules(rs->patterns);
	mosquitto_free(rs);
}

static char *trim(char *s)
{
	char *e;
	while(isspace((unsigned char)*s)) s++;
	e = s + strlen(s);
	while(e > s && isspace((unsigned char)e[-1])) *--e = '\0';
	return s;
}

/* Next space-separated token (mosquitto splits on ' ' only). */
static char *token(char **cursor)
{
	char *s = *cursor, *e;
	while(*s == ' ') s++;
	if(!*s) return NULL;
	e = strchr(s, ' ');
	if(e){
		*e = '\0';
		*cursor = e + 1;
	}else{
		*cursor = s + strlen(s);
	}
	return s;
}

static bool add_rule(struct rule **list, const char *topic, int access)
{
	struct rule *r = mosquitto_calloc(1, sizeof(*r));
	if(!r) return false;
	r->topic = mosquitto_strdup(topic);
	if(!r->topic){
		mosquitto_free(r);
		return false;
	}
	r->access = access;
	r->next = *list;
	*list = r;
	return true;
}

static bool parse_line(struct ruleset *rs, struct owner **current, char *line, const char *path, int lineno)
{
	char *cursor = line, *word = token(&cursor), *access_s, *topic;
	int access;
	bool pattern;

	if(!word) return true; /* blank */
	if(!strcmp(word, "user")){
		char *name = trim(cursor);
		struct owner *o;
		if(!*name){
			mosquitto_log_printf(MOSQ_LOG_ERR, "gate_acl: %s:%d: \"user\" without a name", path, lineno);
			return false;
		}
		for(o = rs->owners; o && !(o->name && !strcmp(o->name, name)); o = o->next);
		if(!o){
			o = mosquitto_calloc(1, sizeof(*o));
			if(!o || !(o->name = mosquitto_strdup(name))){
				mosquitto_free(o);
				mosquitto_log_printf(MOSQ_LOG_ERR, "gate_acl: out of memory reading %s", path);
				return false;
			}
			o->next = rs->owners;
			rs->owners = o;
		}
		*current = o;
		return true;
	}
	if(strcmp(word, "topic") && strcmp(word, "pattern")){
		mosquitto_log_printf(MOSQ_LOG_ERR, "gate_acl: %s:%d: unknown line \"%.*s\"; "
				"expected topic, pattern or user", path, lineno, LOG_TEXT_MAX, word);
		return false;
	}
	pattern = word[0] == 'p';
	access_s = token(&cursor);
	topic = trim(cursor);
	if(!access_s){
		mosquitto_log_printf(MOSQ_LOG_ERR, "gate_acl: %s:%d: %s without a topic", path, lineno, word);
		return false;
	}
	if(!*topic){
		topic = access_s; /* "topic <filter>": read and write */
		access = MOSQ_ACL_READ | MOSQ_ACL_WRITE;
	}else if(!strcmp(access_s, "read")){
		access = MOSQ_ACL_READ;
	}else if(!strcmp(access_s, "write")){
		access = MOSQ_ACL_WRITE;
	}else if(!strcmp(access_s, "readwrite")){
		access = MOSQ_ACL_READ | MOSQ_ACL_WRITE;
	}else if(!strcmp(access_s, "deny")){
		access = MOSQ_ACL_NONE;
	}else{
		mosquitto_log_printf(MOSQ_LOG_ERR, "gate_acl: %s:%d: access \"%.*s\" is not read, write, "
				"readwrite or deny", path, lineno, LOG_TEXT_MAX, access_s);
		return false;
	}
	/* The broker's own check, as for its acl_file: whole-level wildcards, 65,535 bytes, 200 levels. */
	if(mosquitto_sub_topic_check(topic) != MOSQ_ERR_SUCCESS){
		mosquitto_log_printf(MOSQ_LOG_ERR, "gate_acl: %s:%d: \"%.*s\" is not a valid topic filter",
				path, lineno, LOG_TEXT_MAX, topic);
		return false;
	}
	if(pattern && (access & MOSQ_ACL_WRITE) && strstr(topic, "%s")){
		mosquitto_log_printf(MOSQ_LOG_ERR, "gate_acl: %s:%d: %%s is for read rules only (mosquitto "
				"cannot expand it for publishing)", path, lineno);
		return false;
	}
	if(pattern){
		if(!add_rule(&rs->patterns, topic, access)) goto nomem;
		if((access & MOSQ_ACL_READ) && strstr(topic, "%s")) rs->site_reads = true;
		return true;
	}
	if(!*current){
		/* Before the first "user" line: the rules of clients without a username. */
		struct owner *o = mosquitto_calloc(1, sizeof(*o));
		if(!o) goto nomem;
		o->next = rs->owners;
		rs->owners = o;
		*current = o;
	}
	if(!add_rule(&(*current)->rules, topic, access)) goto nomem;
	return true;
nomem:
	mosquitto_log_printf(MOSQ_LOG_ERR, "gate_acl: out of memory reading %s", path);
	return false;
}

static struct ruleset *read_rules(const char *path)
{
	struct ruleset *rs = mosquitto_calloc(1, sizeof(*rs));
	struct owner *current = NULL;
	char *line = NULL;
	size_t cap = 0;
	ssize_t n;
	int lineno = 0;
	bool ok = true;
	FILE *f;

	if(!rs) return NULL;
	f = fopen(path, "r");
	if(!f){
		mosquitto_log_printf(MOSQ_LOG_ERR, "gate_acl: cannot read the ACL file %s; set "
				"plugin_opt_acl_file to the acl_file path", path);
		mosquitto_free(rs);
		return NULL;
	}
	while(ok && (n = getline(&line, &cap, f)) >= 0){
		lineno++;
		while(n > 0 && isspace((unsigned char)line[n - 1])) line[--n] = '\0';
		if(line[0] == '#') continue;
		if(strlen(line) != (size_t)n){
			mosquitto_log_printf(MOSQ_LOG_ERR, "gate_acl: %s:%d: a NUL byte in the line", path, lineno);
			ok = false;
			break;
		}
		ok = parse_line(rs, &current, line, path, lineno);
	}
	free(line);
	fclose(f);
	if(!ok){
		free_ruleset(rs);
		return NULL;
	}
	return rs;
}

/* ------------------------------------------------------------------ logging */

static void log_refusal(struct plugin *pl, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Say how many refusals a second's budget left out, once that second is over. */
static void log_dropped(struct plugin *pl, time_t now)
{
	if(now == pl->log_second) return;
	if(pl->log_dropped){
		mosquitto_log_printf(MOSQ_LOG_NOTICE, "gate_acl: %lu more refusals not logged", pl->log_dropped);
	}
	pl->log_second = now;
	pl->log_count = 0;
	pl->log_dropped = 0;
}

static void log_refusal(struct plugin *pl, const char *fmt, ...)
{
	char text[3 * LOG_TEXT_MAX];
	va_list ap;

	log_dropped(pl, time(NULL));
	if(++pl->log_count > LOG_PER_SECOND){
		pl->log_dropped++;
		return;
	}
	va_start(ap, fmt);
	vsnprintf(text, sizeof(text), fmt, ap);
	va_end(ap);
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "gate_acl: %s", text);
}

/* ------------------------------------------------------------------ callbacks */

static int on_acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ed = event_data;
	struct plugin *pl = userdata;
	struct who w;
	enum verdict v;

	(void)event;
	if(ed->access == MOSQ_ACL_UNSUBSCRIBE) return MOSQ_ERR_SUCCESS;
	if(ed->access == MOSQ_ACL_READ){
		/* Every delivery passes here: answer only for %s rules, at once otherwise. */
		if(!pl->rules || !pl->rules->site_reads) return MOSQ_ERR_PLUGIN_DEFER;
		who_of(ed->client, &w);
		v = decide_site_read(pl->rules, &w, ed->topic);
		return v == GRANT ? MOSQ_ERR_SUCCESS : MOSQ_ERR_PLUGIN_DEFER;
	}
	if(ed->access != MOSQ_ACL_SUBSCRIBE) return MOSQ_ERR_PLUGIN_DEFER;

	who_of(ed->client, &w);
	v = pl->rules ? decide_subscribe(pl->rules, &w, ed->topic) : REFUSE;
	if(v == GRANT) return MOSQ_ERR_SUCCESS;
	/* Out of memory refuses too: an error code would disconnect the client. */
	log_refusal(pl, "refused subscription \"%.*s\" for client \"%.*s\" (identity \"%.*s\")%s",
			LOG_TEXT_MAX, ed->topic, LOG_TEXT_MAX, w.client_id, LOG_TEXT_MAX,
			w.username ? w.username : "", v == OUT_OF_MEMORY ? ": out of memory" : "");
	return MOSQ_ERR_ACL_DENIED;
}

/* The certificate's common name as UTF-8 (mosquitto_free it); NULL when it has none, several, or a NUL. */
static char *common_name(X509 *cert)
{
	X509_NAME *name = X509_get_subject_name(cert);
	unsigned char *utf8 = NULL;
	char *cn;
	int i, n;

	if(!name) return NULL;
	i = X509_NAME_get_index_by_NID(name, NID_commonName, -1);
	if(i < 0 || X509_NAME_get_index_by_NID(name, NID_commonName, i) >= 0) return NULL;
	n = ASN1_STRING_to_UTF8(&utf8, X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, i)));
	if(n <= 0) return NULL;
	cn = (memchr(utf8, '\0', (size_t)n) == NULL) ? mosquitto_malloc((size_t)n + 1) : NULL;
	if(cn){
		memcpy(cn, utf8, (size_t)n);
		cn[n] = '\0';
	}
	OPENSSL_free(utf8);
	return cn;
}

static int on_basic_auth(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_basic_auth *ed = event_data;
	struct plugin *pl = userdata;
	X509 *cert = mosquitto_client_certificate(ed->client);
	const char *client_id = mosquitto_client_id(ed->client);
	const struct owner *o;
	char *cn;
	int rc;

	(void)event;
	/* No certificate: not a listener of ours; whatever else is configured decides. */
	if(!cert) return MOSQ_ERR_PLUGIN_DEFER;
	cn = common_name(cert);
	X509_free(cert);
	if(!client_id) client_id = "";
	if(!cn){
		log_refusal(pl, "refused client \"%.*s\": its certificate has no single common name",
				LOG_TEXT_MAX, client_id);
		return MOSQ_ERR_AUTH;
	}
	o = (pl->rules && !strpbrk(cn, "/+#")) ? owner_of(pl->rules, cn) : NULL;
	if(!o){
		log_refusal(pl, "refused \"%.*s\" on the services listener: not a service identity "
				"(no \"user\" block in the ACL file; gates use their own listener)", LOG_TEXT_MAX, cn);
		mosquitto_free(cn);
		return MOSQ_ERR_AUTH;
	}
	if(strpbrk(client_id, "/+#")){
		log_refusal(pl, "refused \"%.*s\": client id \"%.*s\" holds '/', '+' or '#' "
				"(gate ids hold '/': a service may not take one)", LOG_TEXT_MAX, cn, LOG_TEXT_MAX, client_id);
		mosquitto_free(cn);
		return MOSQ_ERR_AUTH;
	}
	rc = mosquitto_set_username(ed->client, cn);
	mosquitto_free(cn);
	return rc == MOSQ_ERR_SUCCESS ? MOSQ_ERR_SUCCESS : MOSQ_ERR_AUTH;
}

static int on_tick(int event, void *event_data, void *userdata)
{
	struct plugin *pl = userdata;

	(void)event;
	(void)event_data; /* its clock is the broker's monotonic one: ours is time() */
	if(pl->log_dropped) log_dropped(pl, time(NULL));
	return MOSQ_ERR_SUCCESS;
}

static int on_reload(int event, void *event_data, void *userdata)
{
	struct plugin *pl = userdata;
	struct ruleset *rs = read_rules(pl->path);

	(void)event;
	(void)event_data;
	free_ruleset(pl->rules);
	pl->rules = rs;
	if(!rs){
		mosquitto_log_printf(MOSQ_LOG_ERR, "gate_acl: %s did not load at reload: no subscription "
				"is granted and no service may connect until it is fixed and reloaded", pl->path);
	}
	return MOSQ_ERR_SUCCESS;
}

/* ------------------------------------------------------------------ plugin entry points */

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	for(int i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5) return 5;
	}
	return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata,
		struct mosquitto_opt *options, int option_count)
{
	struct plugin *pl;
	const char *path = NULL;

	for(int i = 0; i < option_count; i++){
		if(!strcmp(options[i].key, "acl_file")) path = options[i].value;
	}
	if(!path){
		mosquitto_log_printf(MOSQ_LOG_ERR, "gate_acl: plugin_opt_acl_file is missing; set it to the "
				"acl_file path");
		return MOSQ_ERR_INVAL;
	}
	pl = mosquitto_calloc(1, sizeof(*pl));
	if(!pl) return MOSQ_ERR_NOMEM;
	pl->id = identifier;
	pl->path = mosquitto_strdup(path);
	pl->rules = pl->path ? read_rules(path) : NULL;
	if(!pl->rules){
		mosquitto_free(pl->path);
		mosquitto_free(pl);
		return MOSQ_ERR_INVAL; /* mosquitto does not start */
	}
	*userdata = pl; /* from here on, mosquitto_plugin_cleanup frees it */
	if(mosquitto_callback_register(identifier, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, pl)
			|| mosquitto_callback_register(identifier, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL, pl)
			|| mosquitto_callback_register(identifier, MOSQ_EVT_RELOAD, on_reload, NULL, pl)
			|| mosquitto_callback_register(identifier, MOSQ_EVT_TICK, on_tick, NULL, pl)){
		return MOSQ_ERR_UNKNOWN;
	}
	mosquitto_log_printf(MOSQ_LOG_INFO, "gate_acl: subscription rules from %s", path);
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	struct plugin *pl = userdata;

	(void)options;
	(void)option_count;
	if(!pl) return MOSQ_ERR_SUCCESS;
	mosquitto_callback_unregister(pl->id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
	mosquitto_callback_unregister(pl->id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL);
	mosquitto_callback_unregister(pl->id, MOSQ_EVT_RELOAD, on_reload, NULL);
	mosquitto_callback_unregister(pl->id, MOSQ_EVT_TICK, on_tick, NULL);
	free_ruleset(pl->rules);
	mosquitto_free(pl->path);
	mosquitto_free(pl);
	return MOSQ_ERR_SUCCESS;
}
