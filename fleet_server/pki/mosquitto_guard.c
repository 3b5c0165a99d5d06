/*
 * tidegate_guard: a Mosquitto 2.0 plugin (plugin API v5) for the fleet's device broker.
 *
 What Mosquitto's own configuration cannot say, checked before its acl_file (which still
 * decides everything this plugin defers):
 *
 *   - at CONNECT, the identity is the certificate's: its common name must keep the
 *     thing-naming rule [A-Za-z0-9:_-]{1,128} (no "+", "#" or "/" a CA bug or an insider
 *     put there) and the client id must be that name (as AWS IoT Core's iot:Connect on
 *     client/<thing>); otherwise the CONNACK refuses it, the reason is logged, and the
 *     connection holding that client id keeps its session. The name becomes the MQTT
 *     username the acl_file's %u patterns match (the configuration sets no
 *     use_identity_as_username: with it, Mosquitto 2.0 never asks a plugin at connect);
 *   - a connection without a valid name (there is none after the CONNECT check; kept for a
 *     broker configured otherwise) is refused every publish and subscription;
 *   - no client may subscribe to a shared subscription ($share/...): the SUBACK says so,
 *     where the acl_file grants it and then delivers nothing;
 *   - a device may publish at most `rate_per_s` messages a second, in bursts of `burst`
 *     (a token bucket per client id); beyond it a publish is refused (MQTT 5: a PUBACK with
 *     "not authorized"; the message is dropped) and the refusals are logged, a few at a time.
 *     Service identities (`service_prefix`, which the CA issues only by its service command)
 *     are not limited: the fleet server publishes for the whole fleet.
 *
 * Options (mosquitto.conf, after the `plugin` line): plugin_opt_rate_per_s,
 * plugin_opt_burst, plugin_opt_service_prefix. Built by `tidegate server ca broker-config`
 * (fleet_server/pki/guard.py) against the broker's own headers (mosquitto-dev).
 */

#include <ctype.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>
#include <openssl/x509.h>

#define GUARD_BUCKETS 4096
#define GUARD_NAME_MAX 128

struct guard_bucket {
	char *client_id;
	double tokens;
	double at;
	struct guard_bucket *next;
};

static mosquitto_plugin_id_t *guard_id = NULL;
static struct guard_bucket *guard_table[GUARD_BUCKETS];
static double guard_rate = 20.0;
static double guard_burst = 60.0;
static char guard_service_prefix[64] = "tidegate-";
static unsigned long guard_refused[4]; /* by reason: name, shared subscription, rate, connect */

static double guard_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static unsigned long guard_hash(const char *s)
{
	unsigned long h = 5381;
	unsigned char c;
	while((c = (unsigned char)*s++)){
		h = h * 33 + c;
	}
	return h % GUARD_BUCKETS;
}

static bool guard_valid_name(const char *name)
{
	size_t n = 0;
	if(name == NULL){
		return false;
	}
	for(const char *p = name; *p; p++, n++){
		if(!(isalnum((unsigned char)*p) || *p == ':' || *p == '_' || *p == '-')){
			return false;
		}
	}
	return n >= 1 && n <= GUARD_NAME_MAX;
}

static bool guard_is_service(const char *name)
{
	return strncasecmp(name, guard_service_prefix, strlen(guard_service_prefix)) == 0;
}

/* Whether `client_id` may publish now. Buckets outlive connections (a reconnect does not
 * refill one); one per client id the broker has seen, freed at cleanup. */
static bool guard_take(const char *client_id)
{
	unsigned long h;
	struct guard_bucket *b;
	double t = guard_now();

	if(client_id == NULL){
		return false;
	}
	h = guard_hash(client_id);
	for(b = guard_table[h]; b != NULL; b = b->next){
		if(strcmp(b->client_id, client_id) == 0){
			break;
		}
	}
	if(b == NULL){
		b = mosquitto_calloc(1, sizeof(*b));
		if(b == NULL){
			return true; /* out of memory: the acl_file still decides */
		}
		b->client_id = mosquitto_strdup(client_id);
		if(b->client_id == NULL){
			mosquitto_free(b);
			return true;
		}
		b->tokens = guard_burst;
		b->at = t;
		b->next = guard_table[h];
		guard_table[h] = b;
	}
	b->tokens += (t - b->at) * guard_rate;
	if(b->tokens > guard_burst){
		b->tokens = guard_burst;
	}
	b->at = t;
	if(b->tokens < 1.0){
		return false;
	}
	b->tokens -= 1.0;
	return true;
}

static const char *guard_access(int access)
{
	switch(access){
		case MOSQ_ACL_READ: return "read";
		case MOSQ_ACL_WRITE: return "publish";
		case MOSQ_ACL_SUBSCRIBE: return "subscribe";
		case MOSQ_ACL_UNSUBSCRIBE: return "unsubscribe";
		default: return "access";
	}
}

/* The first ten refusals of a kind, then one in a thousand: a flooding client must not
 * flood the log too. */
static void guard_refuse(int reason, const struct mosquitto_evt_acl_check *ed, const char *why)
{
	unsigned long n = ++guard_refused[reason];
	const char *client_id = mosquitto_client_id(ed->client);
	const char *user = mosquitto_client_username(ed->client);

	if(n <= 10 || n % 1000 == 0){
		mosquitto_log_printf(MOSQ_LOG_NOTICE,
				"tidegate_guard: refused %s %s for client %s (certificate name \"%s\"): %s [%lu so far]",
				guard_access(ed->access), ed->topic ? ed->topic : "", client_id ? client_id : "?",
				user ? user : "(none)", why, n);
	}
}

static int guard_acl(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ed = event_data;
	const char *user = mosquitto_client_username(ed->client);

	(void)event;
	(void)userdata;
	if(!guard_valid_name(user)){
		guard_refuse(0, ed, "the certificate name breaks the thing-naming rule [A-Za-z0-9:_-]{1,128}");
		return MOSQ_ERR_ACL_DENIED;
	}
	if(ed->access == MOSQ_ACL_SUBSCRIBE && ed->topic != NULL && strncmp(ed->topic, "$share/", 7) == 0){
		guard_refuse(1, ed, "shared subscriptions are not served on this broker");
		return MOSQ_ERR_ACL_DENIED;
	}
	if(ed->access == MOSQ_ACL_WRITE && !guard_is_service(user)
			&& !guard_take(mosquitto_client_id(ed->client))){
		guard_refuse(2, ed, "publishing faster than the device rate limit");
		return MOSQ_ERR_ACL_DENIED;
	}
	return MOSQ_ERR_PLUGIN_DEFER;
}

static int guard_connect_refused(const struct mosquitto *client, const char *name, const char *why)
{
	unsigned long n = ++guard_refused[3];
	const char *client_id = mosquitto_client_id(client);
	const char *address = mosquitto_client_address(client);

	if(n <= 100 || n % 1000 == 0){
		mosquitto_log_printf(MOSQ_LOG_NOTICE,
				"tidegate_guard: refused the connection of client id \"%s\" from %s (certificate name \"%s\"): %s [%lu so far]",
				client_id ? client_id : "", address ? address : "?", name ? name : "(none)", why, n);
	}
	return MOSQ_ERR_AUTH;
}

/* CONNECT: the certificate's common name is the identity; the client id must be it. */
static int guard_basic_auth(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_basic_auth *ed = event_data;
	X509 *cert;
	X509_NAME *subject;
	X509_NAME_ENTRY *entry;
	ASN1_STRING *data;
	char name[GUARD_NAME_MAX + 1];
	int i, length;
	const char *client_id;

	(void)event;
	(void)userdata;
	cert = mosquitto_client_certificate(ed->client);
	if(cert == NULL){
		return guard_connect_refused(ed->client, NULL, "no client certificate");
	}
	subject = X509_get_subject_name(cert);
	i = subject ? X509_NAME_get_index_by_NID(subject, NID_commonName, -1) : -1;
	if(i < 0 || X509_NAME_get_index_by_NID(subject, NID_commonName, i) >= 0){
		X509_free(cert);
		return guard_connect_refused(ed->client, NULL, "the certificate has no single common name");
	}
	entry = X509_NAME_get_entry(subject, i);
	data = entry ? X509_NAME_ENTRY_get_data(entry) : NULL;
	length = data ? ASN1_STRING_length(data) : -1;
	if(length < 1 || length > GUARD_NAME_MAX
			|| memchr(ASN1_STRING_get0_data(data), '\0', (size_t)length) != NULL){
		X509_free(cert);
		return guard_connect_refused(ed->client, NULL, "the certificate's common name is empty, too long or holds a NUL");
	}
	memcpy(name, ASN1_STRING_get0_data(data), (size_t)length);
	name[length] = '\0';
	X509_free(cert);
	if(!guard_valid_name(name)){
		return guard_connect_refused(ed->client, name,
				"the certificate name breaks the thing-naming rule [A-Za-z0-9:_-]{1,128}");
	}
	client_id = mosquitto_client_id(ed->client);
	if(client_id == NULL || strcmp(client_id, name) != 0){
		return guard_connect_refused(ed->client, name, "the client id is not the certificate's name");
	}
	if(mosquitto_set_username(ed->client, name) != MOSQ_ERR_SUCCESS){
		return guard_connect_refused(ed->client, name, "out of memory");
	}
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	for(int i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5){
			return 5;
		}
	}
	return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata,
		struct mosquitto_opt *options, int option_count)
{
	char *end;

	(void)userdata;
	guard_id = identifier;
	for(int i = 0; i < option_count; i++){
		if(strcmp(options[i].key, "rate_per_s") == 0){
			guard_rate = strtod(options[i].value, &end);
			if(*end != '\0' || !(guard_rate > 0)){
				mosquitto_log_printf(MOSQ_LOG_ERR, "tidegate_guard: rate_per_s must be a positive number, not \"%s\"",
						options[i].value);
				return MOSQ_ERR_INVAL;
			}
		}else if(strcmp(options[i].key, "burst") == 0){
			guard_burst = strtod(options[i].value, &end);
			if(*end != '\0' || !(guard_burst >= 1)){
				mosquitto_log_printf(MOSQ_LOG_ERR, "tidegate_guard: burst must be a number of at least 1, not \"%s\"",
						options[i].value);
				return MOSQ_ERR_INVAL;
			}
		}else if(strcmp(options[i].key, "service_prefix") == 0){
			if(strlen(options[i].value) < 1 || strlen(options[i].value) >= sizeof(guard_service_prefix)){
				mosquitto_log_printf(MOSQ_LOG_ERR, "tidegate_guard: service_prefix must be 1 to %zu characters",
						sizeof(guard_service_prefix) - 1);
				return MOSQ_ERR_INVAL;
			}
			strcpy(guard_service_prefix, options[i].value);
		}else{
			mosquitto_log_printf(MOSQ_LOG_ERR, "tidegate_guard: unknown option plugin_opt_%s", options[i].key);
			return MOSQ_ERR_INVAL;
		}
	}
	mosquitto_log_printf(MOSQ_LOG_NOTICE,
			"tidegate_guard: client id = certificate name [A-Za-z0-9:_-]{1,128}; devices publish at most "
			"%g/s (bursts of %g); no $share subscriptions; services \"%s...\" not rate limited",
			guard_rate, guard_burst, guard_service_prefix);
	if(mosquitto_callback_register(guard_id, MOSQ_EVT_BASIC_AUTH, guard_basic_auth, NULL, NULL) != MOSQ_ERR_SUCCESS){
		return MOSQ_ERR_UNKNOWN;
	}
	return mosquitto_callback_register(guard_id, MOSQ_EVT_ACL_CHECK, guard_acl, NULL, NULL);
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	(void)userdata;
	(void)options;
	(void)option_count;
	mosquitto_callback_unregister(guard_id, MOSQ_EVT_ACL_CHECK, guard_acl, NULL);
	mosquitto_callback_unregister(guard_id, MOSQ_EVT_BASIC_AUTH, guard_basic_auth, NULL);
	for(int h = 0; h < GUARD_BUCKETS; h++){
		struct guard_bucket *b = guard_table[h];
		while(b != NULL){
			struct guard_bucket *next = b->next;
			mosquitto_free(b->client_id);
			mosquitto_free(b);
			b = next;
		}
		guard_table[h] = NULL;
	}
	return MOSQ_ERR_SUCCESS;
}
