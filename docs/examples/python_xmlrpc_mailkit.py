import xmlrpc.client

# Mailkit's XML-RPC API through sidekey's prefix form. The first two params are the
# client ID and MD5: send placeholders, sidekey writes the tenant's. xmlrpc.client has no
# option for an extra header, so a small Transport adds x-sidekey-tenant.


class SidekeyTransport(xmlrpc.client.Transport):
    def send_headers(self, connection, headers):
        super().send_headers(connection, headers)
        connection.putheader("x-sidekey-tenant", "acme")


mailkit = xmlrpc.client.ServerProxy("http://127.0.0.1:8080/mailkit/rpc.fcgi",
                                    transport=SidekeyTransport())
print(mailkit.mailkit.mailinglist.list(0, "x"))
